"""create_store / open_store: pick the backend from the path and guard against mixing stores."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from chx.errors import ChxError
from chx.store._base import FeatureStore, build_layout, check_feature_shape, fingerprint_diff, normalise_fingerprint


def is_hdf5_path(path) -> bool:
    return str(path).lower().endswith((".h5", ".hdf5"))


def _backend(path):
    if is_hdf5_path(path):
        from chx.store import _hdf5 as mod
        return mod, mod.HDF5FeatureStore
    from chx.store import _zarr as mod
    return mod, mod.ZarrFeatureStore


def open_store(path, mode: str = "r") -> FeatureStore:
    """Open an existing store: mode "r" (read-only, the default) or "r+" (write features, mark complete).

    A Zarr directory (local path or fsspec URL) or an HDF5 file (path ending .h5/.hdf5). A missing or
    damaged store raises ChxError naming the path and what to do."""
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
    path = os.fspath(path) if not isinstance(path, str) else path
    _, cls = _backend(path)
    return cls(path, mode)


def create_store(path, *, image_ids: Sequence[str], study_ids: Sequence[str], views: Sequence[str],
                 splits: Sequence[str], labels, class_names: Sequence[str], feature_shape: Sequence[int],
                 fingerprint: dict, flip: bool = False, overwrite: bool = False,
                 compress: bool = False) -> FeatureStore:
    """Create a store for these images (per-image inputs in any order), or reopen a matching one.

    Images are stored sorted by study (first appearance of each study, then input order), so each
    study is one contiguous slice; `store.image_index(ids)` maps ids to store rows. When `path`
    already holds a store made with the same fingerprint, class names and images (same study for
    each image), it is reopened for writing with its `done` mask kept (resume); its views, splits
    and labels are refreshed from these inputs if they changed (listed in `store.updated_metadata`).
    Any other difference raises ChxError naming it; overwrite=True replaces the store instead.

    compress=True compresses the feature maps (Zarr: zstd; HDF5: lzf + byte shuffle); off by
    default, because float16 maps barely compress (measured 1.00-1.09x) while compression costs
    write and read time (see benchmarks/bench_store_write.py). A reopened store keeps its codec.

    Creation is atomic on local paths (built under a temp name beside the target, then renamed);
    on object storage the attributes, `format_version` among them, are written last, and a store
    without them is refused by open_store as half-initialised."""
    path = os.fspath(path) if not isinstance(path, str) else path
    mod, _ = _backend(path)
    layout = build_layout(image_ids, study_ids, views, splits, labels, class_names)
    shape = check_feature_shape(feature_shape)
    fp = normalise_fingerprint(fingerprint)
    classes = [str(c) for c in class_names]
    if len(set(classes)) != len(classes):
        raise ChxError(f"class names repeat: {sorted({c for c in classes if classes.count(c) > 1})}")

    state, reason = mod.probe(path)
    if state == "foreign":
        raise ChxError(f"{path} exists and is not a chx feature store ({reason}); refusing to replace it: "
                       f"choose another store path")
    if state == "invalid" and not overwrite:
        raise ChxError(f"{path} exists but is not a usable feature store ({reason}); use --overwrite to replace it")
    if state == "store" and not overwrite:
        return _reopen(path, layout, classes, shape, fp, bool(flip), image_ids, study_ids, views, splits, labels)
    created = mod.create(path, layout, classes, shape, fp, bool(flip), replace=(state != "absent"),
                         compress=bool(compress))
    if not created:   # another process created it meanwhile: same checks as a resume
        return _reopen(path, layout, classes, shape, fp, bool(flip), image_ids, study_ids, views, splits, labels)
    return open_store(path, "r+")


def _sample(xs, n=3) -> str:
    xs = sorted(xs)
    return ", ".join(repr(x) for x in xs[:n]) + (", ..." if len(xs) > n else "")


def _reopen(path, layout, classes, shape, fp, flip, image_ids, study_ids, views, splits, labels) -> FeatureStore:
    store = open_store(path, "r+")
    try:
        diffs = []
        fd = fingerprint_diff(store.fingerprint, fp)
        if fd:
            diffs.append("fingerprint field(s) differ: " + "; ".join(fd))
        if store.feature_shape != shape:
            diffs.append(f"feature shape {store.feature_shape} in the store vs {shape} now")
        if store.has_flip != flip:
            diffs.append(f"flip={store.has_flip} in the store vs flip={flip} now")
        if store.class_names != classes:
            a, b = store.class_names, classes
            pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append(f"class list differs ({len(a)} classes in the store vs {len(b)} now; first difference "
                         f"at position {pos}: {a[pos] if pos < len(a) else '<none>'!r} vs "
                         f"{b[pos] if pos < len(b) else '<none>'!r})")
        have, want = set(store.image_ids), set(layout.image_ids)
        if have != want:
            only_store, only_new = have - want, want - have
            parts = []
            if only_store:
                parts.append(f"{len(only_store):,} only in the store (e.g. {_sample(only_store)})")
            if only_new:
                parts.append(f"{len(only_new):,} not in the store (e.g. {_sample(only_new)})")
            diffs.append(f"images differ: {'; '.join(parts)}")
        else:
            rows = store.image_index([str(x) for x in image_ids])
            stored_study = np.repeat(np.asarray(store.study_ids, dtype=object), np.diff(store.study_ptr))
            moved = [str(image_ids[j]) for j, r in enumerate(rows) if stored_study[r] != str(study_ids[j])]
            if moved:
                diffs.append(f"images differ: {len(moved):,} belong to another study now (e.g. {_sample(moved)})")
        if diffs:
            raise ChxError(f"feature store {path} was made differently: {' | '.join(diffs)}; "
                           f"use --overwrite to replace it (or choose another store path)")
        # Same images and studies: bring views/splits/labels to store order and refresh any that changed.
        new_views = [""] * store.n_images
        new_splits = [""] * store.n_images
        for r, v, s in zip(rows, _as_str_list(views), _as_str_list(splits)):
            new_views[r], new_splits[r] = v, s
        lab = np.asarray(labels, dtype=np.float32)
        study_row = {sid: i for i, sid in enumerate(store.study_ids)}
        new_labels = np.empty_like(store.labels)
        for j, sid in enumerate(study_ids):
            new_labels[study_row[str(sid)]] = lab[j]
        store._update_metadata(new_views, new_splits, new_labels)
        return store
    except BaseException:
        store.close()
        raise


def _as_str_list(values) -> list[str]:
    return ["" if v is None else str(v) for v in values]
