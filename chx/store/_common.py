"""What every part of the feature store shares: the array names, required attributes and hints of
its one-line errors, and small helpers (paths, sizes, disk-full errors, runs of rows)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Sequence

import numpy as np

from chx.store import _codec
from chx.store._layout import MARKER

META_ARRAYS = ("study_ptr", "image_id", "view", "split", "study_id", "labels")
REQUIRED_ATTRS = {1: ("format_version", "class_names", "fingerprint", "feature_shape", "complete", "flip"),
                  2: ("format_version", "class_names", "fingerprint", "feature_shape", "complete", "flip",
                      MARKER, "dtype", "shard_images", "checksum")}
DONE_FIELDS = ("done", "features", "features_flip", "scale")   # a format-2 done marker: flag + CRC-32C per array
HINT_RECREATE = "re-create it with `chx extract-features ... --overwrite`"
HINT_REPAIR = "re-extract the damaged shards with `chx extract-features ... --repair`"
REFRESHABLE = ("view", "split", "labels")   # metadata a rerun of extract-features rewrites from the manifest
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(e: BaseException) -> bool:
    """Whether an OSError (h5py's carry the errno in the text only) says the disk or quota is full."""
    if not isinstance(e, OSError):
        return False
    text = str(e)
    return e.errno in DISK_FULL or any(t in text for t in (
        "No space left", "errno = 28", "Disk quota", "errno = 122", "File too large", "errno = 27"))


def local_path(path) -> Path | None:
    """The local path of a plain path or file:// URL; None for other URLs (object storage)."""
    p = str(path)
    if p.startswith("file://"):
        return Path(p[len("file://"):])
    if "://" in p:
        return None
    return Path(p)


def projected_size(n_images: int, feature_shape: Sequence[int], flip: bool = False, dtype: str = "float16") -> int:
    """Bytes the maps take as stored, before compression: n_images * (C*H*W * itemsize of dtype, plus
    C*4 for float8's scale), x2 with flip."""
    return int(n_images) * _codec.stored_bytes_per_map(feature_shape, _codec.check_dtype(dtype)) * (2 if flip else 1)


def is_provably_ours(attrs: dict) -> bool:
    """Whether a group's / file's attributes prove chx made it: the format-2 marker, or format 1's
    own attributes (format_version, class_names and fingerprint together)."""
    return MARKER in attrs or all(k in attrs for k in ("format_version", "class_names", "fingerprint"))


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(start_row, stop_row, offset into rows) for each run of consecutive values in sorted rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def examples(xs, n=3) -> str:
    xs = sorted(xs)
    return ", ".join(repr(x) for x in xs[:n]) + (", ..." if len(xs) > n else "")
