"""Checks that two artifacts belong together: the one place that compares class lists and
backbone fingerprints, so every command says the same thing when they do not."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from chx.errors import ChxError
from chx.store import fingerprint_diff, open_store


def first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    """Where two class lists first differ, for a message."""
    a, b = list(a), list(b)
    pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    x = repr(a[pos]) if pos < len(a) else "<end>"
    y = repr(b[pos]) if pos < len(b) else "<end>"
    return f"{len(a)} vs {len(b)} classes, first difference at position {pos + 1}: {x} vs {y}"


def require_same_classes(have: Sequence[str], want: Sequence[str], have_name: str, want_name: str,
                         fix: str = "prepare the manifest onto the checkpoint's classes "
                                    "(`chx prepare ... --classes`)") -> None:
    """ChxError when ``have`` (e.g. a manifest's classes) is not exactly ``want`` (a checkpoint's):
    "<want_name> was trained on other classes than <have_name> (...)"."""
    if list(have) != list(want):
        raise ChxError(f"{want_name} was trained on other classes than {have_name} "
                       f"({first_difference(want, have)}); {fix}")


def require_same_backbone(store_fingerprint: dict | None, backbone_sha256: str, store_name: str,
                          backbone_name: str) -> None:
    """ChxError when a store (or a fusion model trained on one) was made by another backbone."""
    made_by = (store_fingerprint or {}).get("checkpoint_sha256")
    if made_by is not None and made_by != backbone_sha256:
        raise ChxError(f"{store_name} was made with the features of another backbone than "
                       f"{backbone_name} (weights hash {made_by[:12]} made it, {backbone_name} has "
                       f"{backbone_sha256[:12]}); use the backbone its store was extracted with, or "
                       f"extract a new store")


def _short(value) -> str:
    """A fingerprint value for a message: hashes (64 hex digits) cut to 12."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return repr(value)


def check_fusion_store(ckpt: dict, checkpoint, store) -> list[str]:
    """A fusion checkpoint is scored only on a complete store made like the one it was trained on
    (same classes, same backbone and preprocessing: the fingerprint); returns the store's splits."""
    with open_store(store) as s:
        s.require_complete()    # scoring an incomplete store would read maps that are not there
        require_same_classes(s.class_names, ckpt["class_names"], f"store {store}", str(checkpoint),
                             fix="evaluate on the store the fusion model was trained on (or one "
                                 "extracted with the same classes)")
        trained_on = ckpt.get("store_fingerprint")
        if trained_on and fingerprint_diff(trained_on, s.fingerprint):
            # expected (the training store, recorded in the checkpoint) vs found (this store)
            found = s.fingerprint
            diff = [f"{k} {_short(found.get(k, '<absent>'))} in this store vs "
                    f"{_short(trained_on.get(k, '<absent>'))} in the training store"
                    for k in sorted(set(trained_on) | set(found))
                    if trained_on.get(k, "<absent>") != found.get(k, "<absent>")]
            raise ChxError(f"store {store} was not made like the store {checkpoint} was trained on "
                           f"({'; '.join(diff)}); evaluate on features of the same backbone and "
                           f"options")
        return sorted(set(s.splits) - {""})


def store_data_sha256(store) -> str:
    """A hash of what a store says about its images besides the maps: ids, studies, views, splits
    and labels (the fingerprint says how the maps were made, not which data they are; a store
    extracted again from a manifest with other splits has the same fingerprint)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for part in (store.image_ids, store.study_ids, store.views, store.splits, store.class_names):
        h.update("\x1f".join(map(str, part)).encode())
        h.update(b"\x1e")
    h.update(np.ascontiguousarray(store.study_ptr, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(store.labels, dtype=np.float32).tobytes())
    return h.hexdigest()


def require_same_inputs(ckpt: dict, meta: dict, run: str) -> None:
    """A resumed run trains on what its first part did: the same manifest contents (sha256, whatever
    the file is called now), the same store (fingerprint and data) and the same starting weights.
    ``ckpt`` is the run's last.pt, ``meta`` what this invocation would record; a record missing on
    either side (an older run) is not compared."""
    changed = []
    old, new = ckpt.get("manifest_sha256"), meta.get("manifest_sha256")
    if isinstance(old, dict) and isinstance(new, dict):
        for (name, a), b in zip(old.items(), new.values()):
            if a != b:
                changed.append(f"manifest {name} changed since the run started (sha256 {_short(a)} -> "
                               f"{_short(b)})")
    old, new = ckpt.get("store_fingerprint"), meta.get("store_fingerprint")
    if old and new and fingerprint_diff(old, new):
        diff = [f"{k} {_short(old.get(k, '<absent>'))} -> {_short(new.get(k, '<absent>'))}"
                for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]
        changed.append(f"the store's features were made otherwise ({', '.join(diff)})")
    old, new = ckpt.get("store_data_sha256"), meta.get("store_data_sha256")
    if old and new and old != new:
        changed.append(f"the store holds other images, splits or labels (data sha256 {_short(old)} -> "
                       f"{_short(new)})")
    old, new = ckpt.get("initialised_from"), meta.get("initialised_from")
    if isinstance(old, dict) and isinstance(new, dict):
        changed += [f"the --{k.removesuffix('_sha256')} checkpoint's weights changed ({_short(old[k])} -> "
                    f"{_short(new.get(k))})" for k in sorted(old) if k in new and old[k] != new[k]]
    if changed:
        raise ChxError(f"--resume: the run in {run} trained on other inputs: {'; '.join(changed)}; resume "
                       f"with the inputs the run started with (see its config.json) or start a new --out")


# ------------------------------------------------------------------------ patient leakage, by content

def _id_hashes(values) -> np.ndarray:
    """A stable 8-byte hash of each id (as text), in order."""
    import hashlib

    return np.fromiter((int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little",
                                       signed=True) for v in values), dtype=np.int64, count=len(values))


def _patient_column(df) -> str:
    """Patients where the manifest names them, else studies (a study is one patient's)."""
    return ("subject_id" if "subject_id" in df.columns and df["subject_id"].null_count() < df.height
            else "study_id")


def training_patients(df) -> dict:
    """What a checkpoint records of its training split to notice leakage later by content, not by
    the manifest's file name: 8-byte hashes of its patients (65k patients: 0.5 MB)."""
    import polars as pl
    import torch

    col = _patient_column(df)
    train = df.filter(pl.col("split").is_null() | (pl.col("split") == "train"))[col].drop_nulls().unique()
    return {"column": col, "hashes": torch.from_numpy(np.unique(_id_hashes(train.cast(pl.Utf8).to_list())))}


def leakage_warning(ckpt: dict, df, manifest, checkpoint) -> str | None:
    """A warning line when patients of ``ckpt``'s training split are in another split of ``df``
    (a manifest re-split, renamed or edited after training), else None. A checkpoint made before
    the record falls back to the manifest's sha256 under its file name."""
    import polars as pl

    record = ckpt.get("train_patients")
    if not record:
        from chx.data.manifest import file_sha256

        trained_on = (ckpt.get("manifest_sha256") or {}).get(str(manifest))
        if trained_on is not None and trained_on != file_sha256(manifest):
            return (f"warning: {manifest} changed since {checkpoint} was trained on it (its splits may "
                    f"differ: patients of the backbone's training split could now be in val/test)")
        return None
    col = record["column"] if record["column"] in df.columns else "study_id"
    held_out = df.filter(pl.col("split").is_not_null() & (pl.col("split") != "train"))
    ids = held_out[col].cast(pl.Utf8).to_list()
    hit = np.isin(_id_hashes(ids), np.asarray(record["hashes"])) & held_out[col].is_not_null().to_numpy()
    if not hit.any():
        return None
    rows = held_out.filter(pl.Series(hit))
    splits = ", ".join(f"{s} {n:,}" for s, n in sorted(rows.group_by("split").len().iter_rows()))
    who = "patient" if col == "subject_id" else "study"
    return (f"warning: {rows[col].n_unique():,} {who}(s) outside the training split of {manifest} "
            f"({rows.height:,} images: {splits}) were in the training split of {checkpoint}: their scores "
            f"are inflated (patient leakage); use the manifest the model was trained on, or retrain")
