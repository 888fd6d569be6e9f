"""What a store reports about itself: :func:`verify` (every done shard read back and checked
against its checksums) and :func:`info` (layout, sizes, progress; `chx store info`)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chx.errors import ChxError
from chx.store import _codec
from chx.store._common import DONE_FIELDS, HINT_REPAIR, projected_size


@dataclass
class ShardProblem:
    """One damaged shard found by verify: which, its store rows (start, stop), its first image, what is wrong."""

    shard: int
    rows: tuple[int, int]
    first_image: str
    problem: str


@dataclass
class VerifyReport:
    """What :meth:`FeatureStore.verify` found: every done shard read back, its checksums compared."""

    path: str
    n_shards: int
    checked: int                       # done shards read back
    checksums: bool                    # False for format 1 (written without checksums)
    complete: bool
    not_extracted: list[int] = field(default_factory=list)    # shards never written (an incomplete store)
    problems: list[ShardProblem] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    bound: bool = True                 # checksums bound to their place, per image too (False: an older store)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.not_extracted

    @property
    def bad_shards(self) -> np.ndarray:
        """Shards to re-extract: pass them to ``store.mark_shards_missing`` (what ``--repair`` does)."""
        return np.asarray(sorted({p.shard for p in self.problems}), dtype=np.int64)

    def summary(self) -> str:
        head = (f"{self.path}: {self.checked:,} of {self.n_shards:,} shards read back"
                f"{' and checksummed' if self.checksums else ' (format 1: no checksums)'}"
                + ("" if self.bound or not self.checksums else " (an older store: checksums not bound to their place; "
                                                               "rebuild it with --overwrite for that check)"))
        if self.ok:
            return f"{head}: no problems"
        parts = []
        if self.problems:
            parts.append(f"{len(self.bad_shards):,} damaged shard(s); {HINT_REPAIR}")
        if self.not_extracted:
            parts.append(f"{len(self.not_extracted):,} shard(s) not extracted yet; rerun `chx extract-features` "
                         f"to finish the store")
        return f"{head}: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "n_shards": self.n_shards, "checked": self.checked,
                "checksums": self.checksums, "bound": self.bound, "complete": self.complete,
                "not_extracted": self.not_extracted,
                "problems": [vars(p) for p in self.problems], "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3)}


def verify(store) -> VerifyReport:
    """Read every done shard back (every array), check its stored CRC-32C checksums (format 2;
    bound to the shard's place and, row by row, to each image's in stores with integrity >= 1)
    and report what is missing, undecodable, changed, moved or NaN. Never raises for a damaged shard."""
    t0 = time.perf_counter()
    done = store._shard_done_mask()
    records = readable_records(store) if store.is_sharded else None
    report = VerifyReport(store.path, store.n_shards, 0, records is not None, store.complete,
                          not_extracted=[int(s) for s in np.flatnonzero(~done)], bound=bool(store._integrity))
    for s in np.flatnonzero(done):
        a, b = store.shard_rows(s)
        report.checked += 1
        problems, nbytes = _problems(store, int(s), records)
        report.bytes_read += nbytes
        for problem in problems:
            report.problems.append(ShardProblem(int(s), (a, b), store.image_ids[a], problem))
    report.seconds = time.perf_counter() - t0
    return report


def readable_records(store) -> np.ndarray:
    """All done records; a damaged one reads as zeros (verify then reports its checksums lost)."""
    try:
        return store._shard_records(0, store.n_shards)
    except Exception:
        out = np.zeros((store.n_shards, store._array_shape("shard_done")[1]), dtype=np.uint32)
        for s in range(store.n_shards):
            try:
                out[s] = store._shard_records(s, s + 1)[0]
            except Exception:
                pass
        return out


def shard_problems(store, s: int) -> list[str]:
    """What is wrong with done shard s: unreadable arrays, checksum mismatches ([] when sound)."""
    return _problems(store, s, None)[0]


def _problems(store, s: int, records: np.ndarray | None) -> tuple[list[str], int]:
    """(shard_problems of s, bytes read); records: all done records (verify), else read here."""
    a, b = store.shard_rows(s)
    if records is None and store.is_sharded:
        try:
            records = {s: store._shard_records(s, s + 1)[0]}
        except Exception:
            records = {s: np.zeros(store._array_shape("shard_done")[1], dtype=np.uint32)}
    out, nbytes = [], 0
    if records is not None and records[s][0] != 1:
        return [f"shard {s} has no readable done marker (checksums lost)"], 0
    for name in store._checked:
        try:
            raw = store._read_checked(name, a, b, check_rows=False)
        except ChxError as e:
            out.append(str(e))
            continue
        nbytes += raw.nbytes
        if records is not None:
            want, got = int(records[s][DONE_FIELDS.index(name)]), store._shard_crc(name, s, raw)
            if want != got:
                out.append(f"{name} of shard {s} (rows {a}..{b - 1}) changed since it was written, or was "
                           f"copied from another place or store (CRC-32C {got:08x}, written {want:08x})")
                continue
        bad = _codec.nonfinite_rows(raw, store.dtype) if name != "scale" else \
            ~np.isfinite(raw.reshape(len(raw), -1)).all(axis=1)
        if bad.any():                # older stores, written before NaN was refused at write time
            out.append(f"the {name} of {store._where(a + int(np.flatnonzero(bad)[0]))} hold NaN or inf")
        elif records is not None:
            try:                     # the per-row checksums of the record agree with the data too
                store._check_rows(name, a, b, raw)
            except ChxError as e:
                out.append(str(e))
    return out, nbytes


def info(store) -> dict[str, Any]:
    """Figures for `chx store info`: layout, dtype, bytes per image, sizes (real on disk as `du`
    counts them, and logical), objects, progress."""
    done = int(store.done.sum())
    counts = np.diff(store.study_ptr)
    vals, freq = np.unique(counts, return_counts=True)
    on_disk, logical, files = store._disk_usage()
    feat_disk = store.feature_bytes_on_disk()
    stored = done * store.stored_bytes_per_image      # maps written so far, as stored before compression
    return {
        "path": store.path, "backend": store.backend, "format_version": store.format_version,
        "layout": (f"sharded: {store.shard_images} images per shard object" if store.is_sharded
                   else "one object per image (format 1)"),
        "shard_images": store.shard_images, "shards": store.n_shards,
        "missing_shards": int(len(store.missing_shards())),
        "shards_without_objects": int(len(store.shards_without_objects())),
        "images": store.n_images, "studies": store.n_studies,
        "views_per_study": {int(v): int(f) for v, f in zip(vals, freq)},
        "splits": dict(Counter(store.study_splits)), "split_images": dict(Counter(store.splits)),
        "feature_shape": list(store.feature_shape), "dtype": store.dtype, "flip": store.has_flip,
        "compressed": store.compressed, "checksums": _codec.CHECKSUM if store.is_sharded else None,
        "bytes_per_image": store.stored_bytes_per_image, "bytes_per_image_decoded": store.nbytes_per_image,
        "bytes_on_disk": on_disk, "bytes_logical": logical, "files": files,
        "files_per_image": (files / store.n_images) if files else None,
        "bytes_uncompressed": stored,
        "bytes_projected": projected_size(store.n_images, store.feature_shape, store.has_flip, store.dtype),
        "feature_bytes_on_disk": feat_disk,
        "compression_ratio": (stored / feat_disk) if feat_disk and stored else None,
        "fingerprint": store.fingerprint, "class_names": store.class_names,
        "done": done, "complete": store.complete,
    }
