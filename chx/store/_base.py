"""Backend-neutral parts of the feature store: the common class, its reports, the backend contract.

The backend contract: a backend subclasses :class:`FeatureStore`, says whether it takes parallel
writers (``supports_parallel_writers``), implements the classmethods ``probe`` (what a path holds
now) and ``create`` (a new store from a :class:`StoreSpec`), and the primitives marked "backend"
below (open, attributes, whole small arrays, raw rows of the feature arrays, done markers, disk
usage). Attribute, version and shape checks, dtype encoding, checksums, the shard API, reads with
their error reports, ``verify``, ``info`` and the reopen check live here, once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chx.errors import ChxError
from chx.store import _codec
from chx.store._layout import FORMAT_VERSION, LEGACY_SHARD_IMAGES, MARKER, StoreSpec, fingerprint_diff
from chx.store._shardfile import ShardFileError

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


@dataclass
class StudyFeatures:
    """One study read from a store: its views' feature maps in store order, decoded to float16."""

    study_id: str
    features: np.ndarray              # [V, C, H, W] float16
    features_flip: np.ndarray | None  # [V, C, H, W] float16, or None when the store has no flip
    views: list[str]
    image_ids: list[str]
    labels: np.ndarray                # [K] float32, NaN = not annotated
    split: str


@dataclass
class StoredMaps:
    """Maps of store rows as stored: decode them with :func:`chx.store.decode_maps` (numpy or torch)."""

    features: np.ndarray              # [n, C, H, W] float16 | uint16 (bfloat16 bits) | uint8 (float8 e4m3)
    features_flip: np.ndarray | None
    scale: np.ndarray | None          # [n, 1 or 2 (features, features_flip), C] float32, float8 only
    dtype: str

    def decoded(self, flip: bool = False):
        """[n, C, H, W] float16 of the maps (the flipped ones with flip=True)."""
        raw = self.features_flip if flip else self.features
        return _codec.decode(raw, self.dtype, None if self.scale is None else self.scale[:, int(flip)])


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(start_row, stop_row, offset into rows) for each run of consecutive values in sorted rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def _sample(xs, n=3) -> str:
    xs = sorted(xs)
    return ", ".join(repr(x) for x in xs[:n]) + (", ..." if len(xs) > n else "")


def _as_str_list(values) -> list[str]:
    return ["" if v is None else str(v) for v in values]


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


class FeatureStore:
    """A chx feature store: images ordered by study (CSR), feature maps in shards, a done marker per shard.

    Open one with :func:`chx.store.open_store` or :func:`chx.store.create_store`; the two backends
    (Zarr directory, HDF5 file) share this interface. Small metadata (ids, views, splits, labels,
    study pointers) is read once at open; maps and done markers are read on demand.

    Shards: store rows [s*S, min((s+1)*S, n)) form shard s (S = ``shard_images``). A writer owns
    whole shards (:meth:`shards_for_writer`) and writes each at once (:meth:`write_shard`), which
    marks it done as one unit. Format-1 stores (one object per image, a done flag per image) take
    the same API with blocks of 64 rows standing in for shards, and also take :meth:`write` of any rows.
    """

    backend: str = ""
    supports_parallel_writers: bool = False

    def __init__(self, path: str, mode: str, *, refresh_meta: bool = False):
        """refresh_meta (create_store's resume): views, splits or labels that fail their checksum are
        left for :meth:`_reopen` to rewrite from the manifest instead of refusing the store."""
        self.path = str(path)
        self.mode = mode
        self._index: dict[str, int] | None = None
        self.updated_metadata: list[str] = []   # set by create_store when it refreshed views/splits/labels
        self._stale_meta: list[str] = []
        self._open(mode)
        try:
            self._attrs = self._check_attrs(self._read_attrs())
            self._open_arrays(self._array_names())
            self._check_arrays()
            self._load_metadata()
            self._check_meta(refresh_meta)
            if self.writable:
                self._recover_in_flight()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------- backend contract (overridden)
    @classmethod
    def probe(cls, path: str) -> tuple[str, str]:
        """What `path` holds now, with a reason: 'absent' (nothing, or an empty folder), 'store' (a
        usable chx store), 'damaged' (provably a chx store, but broken or half-made: --overwrite may
        replace it), 'busy' (in use by another process that the backend cannot share it with: never
        replaced, not reopened), 'creating' (object storage: provably chx's, its creation not finished
        yet - another writer is making it, or one was interrupted; create_store joins it idempotently)
        or 'foreign' (anything else: never replaced)."""
        raise NotImplementedError

    @classmethod
    def create(cls, path: str, spec: StoreSpec, replace: bool) -> bool:
        """Create a store at path; False when another process created one there first (not replace)."""
        raise NotImplementedError

    def _open(self, mode: str) -> None:
        raise NotImplementedError

    def _read_attrs(self) -> dict:
        """The attributes as stored now (another process may have marked the store complete)."""
        raise NotImplementedError

    def _set_attrs(self, attrs: dict) -> None:
        raise NotImplementedError

    def _open_arrays(self, names: list[str]) -> None:
        raise NotImplementedError

    def _array_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _array_dtype(self, name: str) -> np.dtype:
        raise NotImplementedError

    @property
    def compressed(self) -> bool:
        """Whether the maps are stored compressed (create_store's compress=True)."""
        raise NotImplementedError

    def _read_array(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _replace_array(self, name: str, values: np.ndarray) -> None:
        raise NotImplementedError

    def _read_raw(self, name: str, start: int, stop: int) -> np.ndarray:
        """Stored rows start..stop-1 of a feature array (or `scale`); may raise ShardFileError."""
        raise NotImplementedError

    def _fill_if_missing(self, name: str) -> bool:
        """Whether rows of a missing object read back as zeros (the fill value) instead of raising."""
        raise NotImplementedError

    def _object_missing(self, name: str, row: int) -> bool:
        """Whether the object holding `row` of `name` is absent (only asked after an all-zero read)."""
        raise NotImplementedError

    def _missing_objects(self) -> dict[str, np.ndarray]:
        """Per feature array, the shards whose object is absent (format 2; {} where it cannot tell cheaply)."""
        raise NotImplementedError

    def _write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Format 1: write stored values of sorted, distinct rows."""
        raise NotImplementedError

    def _write_shard_raw(self, name: str, shard: int, values: np.ndarray) -> None:
        """Format 2: write all stored rows of one shard of `name` at once (never a read-modify-write)."""
        raise NotImplementedError

    def _done_units(self) -> np.ndarray:
        """Bool done flags as stored now: per row (format 1) or per shard (format 2)."""
        raise NotImplementedError

    def _set_done(self, units: np.ndarray, records: np.ndarray | None = None) -> None:
        """Mark rows (format 1) or shards (format 2, with their [len(units), 4] uint32 done records) done."""
        raise NotImplementedError

    def _clear_done(self, units: np.ndarray) -> None:
        raise NotImplementedError

    def _shard_records(self, start: int, stop: int) -> np.ndarray:
        """Format 2: [stop - start, width] uint32 done records of those shards (DONE_FIELDS, then the
        per-row checksums where the store has them; zeros: not done)."""
        raise NotImplementedError

    def _disk_usage(self) -> tuple[int | None, int | None, int | None]:
        """(bytes on disk as `du` counts them, logical bytes, number of files) of the whole store;
        Nones where the storage is not local."""
        raise NotImplementedError

    def feature_bytes_on_disk(self) -> int | None:
        """Logical (stored, compressed) bytes of the feature arrays; None where the storage is not local."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --------------------------------------------------------------------------- open-time checks
    def _check_attrs(self, attrs: dict) -> dict:
        version = attrs.get("format_version")
        if version is not None:
            try:
                version = int(version)
            except (TypeError, ValueError):
                raise ChxError(f"feature store {self.path} has an unreadable format_version {version!r}; "
                               f"{HINT_RECREATE}") from None
            if version > FORMAT_VERSION:
                raise ChxError(f"feature store {self.path} has format version {version}, newer than this "
                               f"chx reads ({FORMAT_VERSION}); upgrade chx")
            if version < 1:
                raise ChxError(f"feature store {self.path} has format version {version}; {HINT_RECREATE}")
        need = REQUIRED_ATTRS[version if version is not None else (2 if MARKER in attrs else 1)]
        missing = [a for a in need if a not in attrs]
        if missing:
            raise ChxError(f"{self.path} is not a chx feature store, or its creation was interrupted "
                           f"(attribute(s) {', '.join(missing)} missing); {HINT_RECREATE}")
        if version >= 2 and attrs["dtype"] not in _codec.DTYPES:
            raise ChxError(f"feature store {self.path} has dtype {attrs['dtype']!r}, which this chx does not "
                           f"read ({', '.join(_codec.DTYPES)}); upgrade chx")
        return attrs

    def _array_names(self) -> list[str]:
        names = ["features"] + (["features_flip"] if self._attrs.get("flip") else [])
        if int(self._attrs["format_version"]) >= 2:
            names += (["scale"] if _codec.has_scale(self._attrs["dtype"]) else []) + ["shard_done"]
        else:
            names += ["done"]
        return names + list(META_ARRAYS)

    def _check_arrays(self) -> None:
        n = self._array_shape("image_id")[0] if self._array_shape("image_id") else 0
        shape = tuple(int(s) for s in self._attrs["feature_shape"])
        version, dtype = int(self._attrs["format_version"]), self._attrs.get("dtype", "float16")
        expect = {"features": (n, *shape), "features_flip": (n, *shape), "view": (n,), "split": (n,)}
        if version >= 2:
            s = int(self._attrs["shard_images"])
            if s < 1:
                raise ChxError(f"feature store {self.path} is damaged: shard_images={s}; {HINT_RECREATE}")
            checked = 1 + int(bool(self._attrs["flip"])) + int(_codec.has_scale(dtype))
            rows = s * checked if int(self._attrs.get("integrity", 0)) >= 1 else 0   # per-row checksums
            expect["shard_done"] = (math.ceil(n / s), len(DONE_FIELDS) + rows)
            expect["scale"] = (n, 1 + int(bool(self._attrs["flip"])), shape[0])
        else:
            expect["done"] = (n,)
        for name in self._array_names():
            have = self._array_shape(name)
            if name in expect and have != expect[name]:
                raise ChxError(f"feature store {self.path} is damaged: {name} has shape {have}, expected "
                               f"{expect[name]}; {HINT_RECREATE}")
        for name in ("features", "features_flip"):
            if name in self._array_names() and self._array_dtype(name) != _codec.STORED_NUMPY[dtype]:
                raise ChxError(f"feature store {self.path} is damaged: {name} is stored as {self._array_dtype(name)}, "
                               f"not {_codec.STORED_NUMPY[dtype]} ({dtype}); {HINT_RECREATE}")

    def _load_metadata(self) -> None:
        attrs = self._attrs
        self._class_names = [str(c) for c in attrs["class_names"]]
        self._fingerprint = dict(attrs["fingerprint"])
        self._feature_shape = tuple(int(s) for s in attrs["feature_shape"])
        self._has_flip = bool(attrs["flip"])
        self._image_ids = [str(x) for x in self._read_array("image_id").tolist()]
        self._views = [str(x) for x in self._read_array("view").tolist()]
        self._splits = [str(x) for x in self._read_array("split").tolist()]
        self._study_ids = [str(x) for x in self._read_array("study_id").tolist()]
        self._study_ptr = np.asarray(self._read_array("study_ptr"), dtype=np.int64)
        self._labels = np.asarray(self._read_array("labels"), dtype=np.float32)
        n, s = len(self._image_ids), len(self._study_ids)
        problems = []
        if not (len(self._views) == len(self._splits) == n):
            problems.append("per-image columns differ in length")
        if self._study_ptr.shape != (s + 1,) or self._study_ptr[0] != 0 or self._study_ptr[-1] != n \
                or np.any(np.diff(self._study_ptr) < 1):
            problems.append("study_ptr is not a valid CSR pointer")
        if self._labels.shape != (s, len(self._class_names)):
            problems.append(f"labels have shape {self._labels.shape}, expected ({s}, {len(self._class_names)})")
        if problems:
            raise ChxError(f"feature store {self.path} is inconsistent ({'; '.join(problems)}); {HINT_RECREATE}")
        self._integrity = int(attrs.get("integrity", 0)) if int(attrs["format_version"]) >= 2 else 0
        fp = json.dumps(self._fingerprint, sort_keys=True).encode("utf-8")
        self._fp_tag = hashlib.sha256(fp).hexdigest()[:16]     # what every bound checksum starts from
        self._checked = ["features"] + (["features_flip"] if self._has_flip else []) \
            + (["scale"] if _codec.has_scale(self.dtype) else [])

    def _meta_values(self) -> dict:
        return {"study_ptr": self._study_ptr, "image_id": self._image_ids, "view": self._views,
                "split": self._splits, "study_id": self._study_ids, "labels": self._labels}

    def _check_meta(self, refresh: bool) -> None:
        """Stores with integrity >= 1: every metadata array against its checksum (``meta_crc``), so a
        lost object (read back as fill values) or a changed one is refused, never used."""
        if not self._integrity:
            return
        stored = self._attrs.get("meta_crc")
        stored = stored if isinstance(stored, dict) else {}
        for name, values in self._meta_values().items():
            if stored.get(name) == _codec.meta_crc32c(values):
                continue
            if refresh and name in REFRESHABLE:
                self._stale_meta.append(name)       # _reopen rewrites it from the manifest
                continue
            fix = (f"rerun `chx extract-features` (the same command) to rewrite it from the manifest, or "
                   f"{HINT_RECREATE}") if name in REFRESHABLE else HINT_RECREATE
            raise ChxError(f"feature store {self.path}: its {name} array does not match its checksum (an object "
                           f"of it is missing, or it was changed since it was written); {fix}")

    def _store_meta_crc(self) -> None:
        if self._integrity:
            crc = {k: _codec.meta_crc32c(v) for k, v in self._meta_values().items()}
            self._set_attrs({"meta_crc": crc})
            self._attrs["meta_crc"] = crc

    def require_complete(self) -> None:
        """ChxError (one line) unless the store is complete and, where the backend can tell cheaply
        (Zarr format 2: one listing per array), every shard object of it exists."""
        if not self.complete:
            missing = self.missing_shards()
            rows = sum(b - a for a, b in map(self.shard_rows, missing))
            raise ChxError(f"feature store {self.path} is incomplete: {rows:,} of {self.n_images:,} images "
                           f"({len(missing):,} of {self.n_shards:,} shards) not extracted; finish it with "
                           f"`chx extract-features` (rerun the same command)")
        gone = self.shards_without_objects().tolist()
        if gone:
            a, _ = self.shard_rows(gone[0])
            raise ChxError(f"feature store {self.path} is marked complete but the objects of {len(gone):,} shard(s) "
                           f"are missing (shard {gone[0]}, from image {self._image_ids[a]!r}"
                           f"{', ...' if len(gone) > 1 else ''}); {HINT_REPAIR}")

    def shards_without_objects(self) -> np.ndarray:
        """int64 shards with a map object missing, from one listing per array (Zarr format 2; empty
        where the backend cannot tell cheaply: there, reads and :meth:`verify` find them). The quick
        check for ``--repair``; :meth:`verify` also finds truncated and changed objects."""
        return np.asarray(sorted({int(s) for v in self._missing_objects().values() for s in v}), dtype=np.int64)

    # --------------------------------------------------------------------------------- properties
    @property
    def n_images(self) -> int:
        return len(self._image_ids)

    @property
    def n_studies(self) -> int:
        return len(self._study_ids)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return self._feature_shape  # type: ignore[return-value]

    @property
    def format_version(self) -> int:
        return int(self._attrs["format_version"])

    @property
    def is_sharded(self) -> bool:
        """Format 2: shards are real (one object per shard and array, a done marker per shard)."""
        return self.format_version >= 2

    @property
    def dtype(self) -> str:
        """How maps are stored: float16, bfloat16 or float8 (reads always return float16)."""
        return str(self._attrs.get("dtype", "float16"))

    @property
    def shard_images(self) -> int:
        """Images per shard, S (format 1: 64, the block that stands in for a shard)."""
        return int(self._attrs["shard_images"]) if self.is_sharded else LEGACY_SHARD_IMAGES

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_images / self.shard_images)

    @property
    def study_ids(self) -> list[str]:
        return self._study_ids

    @property
    def image_ids(self) -> list[str]:
        return self._image_ids

    @property
    def views(self) -> list[str]:
        return self._views

    @property
    def splits(self) -> list[str]:
        """Per image, in store order ('' = none)."""
        return self._splits

    @property
    def study_splits(self) -> list[str]:
        return [self._splits[int(p)] for p in self._study_ptr[:-1]]

    @property
    def labels(self) -> np.ndarray:
        """[n_studies, K] float32, NaN = not annotated."""
        return self._labels

    @property
    def study_ptr(self) -> np.ndarray:
        return self._study_ptr

    @property
    def has_flip(self) -> bool:
        return self._has_flip

    @property
    def nbytes_per_image(self) -> int:
        """Bytes per image as read (decoded float16): C*H*W*2, x2 with flip (what a reader holds in memory)."""
        return int(np.prod(self._feature_shape)) * _codec.DECODED_DTYPE.itemsize * (2 if self._has_flip else 1)

    @property
    def stored_bytes_per_image(self) -> int:
        """Bytes per image as stored, before compression: C*H*W*itemsize (+ C*4 float8 scale), x2 with flip."""
        return projected_size(1, self._feature_shape, self._has_flip, self.dtype)

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    @property
    def complete(self) -> bool:
        return bool(self._read_attrs().get("complete", False))

    # ------------------------------------------------------------------------------------- shards
    def shard_rows(self, s: int) -> tuple[int, int]:
        """Store rows (start, stop) of shard s."""
        s = int(s)
        if not 0 <= s < self.n_shards:
            raise IndexError(f"shard {s} out of range 0..{self.n_shards - 1}")
        return s * self.shard_images, min((s + 1) * self.shard_images, self.n_images)

    def shard_of_row(self, rows) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) // self.shard_images

    def study_shard_ids(self) -> np.ndarray:
        """int64 [n_studies]: the shard of each study's first image (format 1: blocks of 64 rows).
        Studies are in store order, so the ids never decrease; a study may run into the next shard."""
        return self._study_ptr[:-1] // self.shard_images

    def shards_for_writer(self, i: int, n: int) -> np.ndarray:
        """The shards writer i of n owns: s % n == i (ascending). Disjoint across writers, covering all
        shards, and stable across reruns with the same n, so a rerun redoes exactly its own shards.
        Intersect with :meth:`missing_shards` for the work left. ChxError for n > 1 on a backend
        that takes one writer (HDF5)."""
        i, n = int(i), int(n)
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"writer {i} of {n}: need n >= 1 and 0 <= i < n")
        if n > 1 and not self.supports_parallel_writers:
            raise ChxError(f"{self.backend} feature store {self.path} takes one writer, not {n}: run one "
                           f"extraction (no --shard/torchrun), or use a Zarr store (a folder path, e.g. "
                           f"features.zarr) for parallel extraction")
        return np.arange(i, self.n_shards, n, dtype=np.int64)

    def _shard_done_mask(self) -> np.ndarray:
        if self.complete:
            return np.ones(self.n_shards, dtype=bool)
        units = self._done_units()
        if self.is_sharded:
            return units
        return np.logical_and.reduceat(units, np.arange(0, self.n_images, self.shard_images))

    def missing_shards(self) -> np.ndarray:
        """int64 shard ids not marked done (read fresh: other writers may add shards)."""
        return np.flatnonzero(~self._shard_done_mask()).astype(np.int64)

    @property
    def done(self) -> np.ndarray:
        """Bool [n_images]: which rows hold features (read fresh: other writers may add shards)."""
        if self.complete:
            return np.ones(self.n_images, dtype=bool)
        units = self._done_units()
        if not self.is_sharded:
            return units
        return np.repeat(units, np.diff(np.append(np.arange(0, self.n_images, self.shard_images), self.n_images)))

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.done).astype(np.int64)

    # ------------------------------------------------------------------------------------ lookups
    def image_index(self, image_ids: Sequence[str]) -> np.ndarray:
        """Store rows of the given image ids (ChxError for an id the store does not hold)."""
        if self._index is None:
            self._index = {x: i for i, x in enumerate(self._image_ids)}
        out = np.empty(len(image_ids), dtype=np.int64)
        for j, x in enumerate(image_ids):
            r = self._index.get(str(x))
            if r is None:
                raise ChxError(f"image {x!r} is not in feature store {self.path}")
            out[j] = r
        return out

    def study_indices(self, split: str | None = None) -> np.ndarray:
        """Indices of the studies in a split (all studies when split is None)."""
        if split is None:
            return np.arange(self.n_studies, dtype=np.int64)
        return np.flatnonzero(np.asarray(self.study_splits, dtype=object) == split).astype(np.int64)

    # -------------------------------------------------------------------------------------- reads
    def read_study(self, i: int) -> StudyFeatures:
        """One study: its images' maps [V, C, H, W] float16 in one contiguous read (plus one for the flip)."""
        i = int(i)
        if not 0 <= i < self.n_studies:
            raise IndexError(f"study index {i} out of range 0..{self.n_studies - 1}")
        a, b = int(self._study_ptr[i]), int(self._study_ptr[i + 1])
        feats, flips = self._read_maps(a, b, self._has_flip)
        return StudyFeatures(study_id=self._study_ids[i], features=feats, features_flip=flips,
                             views=self._views[a:b], image_ids=self._image_ids[a:b],
                             labels=self._labels[i].copy(), split=self._splits[a])

    def read_image(self, row: int, flip: bool = False) -> np.ndarray:
        """Maps [C, H, W] float16 of one store row (the flipped copy with flip=True)."""
        row = int(row)
        if not 0 <= row < self.n_images:
            raise IndexError(f"row {row} out of range 0..{self.n_images - 1}")
        if flip and not self._has_flip:
            raise ChxError(f"feature store {self.path} has no flipped features (created without flip)")
        return self._read_maps(row, row + 1, flip, only_flip=flip)[1 if flip else 0][0]

    def read_shard(self, s: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(maps, flipped maps or None) [rows of shard s, C, H, W] float16: one read per array, the
        fast path for streaming a store that does not fit in memory (rows: :meth:`shard_rows`)."""
        a, b = self.shard_rows(s)
        return self._read_maps(a, b, self._has_flip)

    def read_shard_stored(self, s: int) -> StoredMaps:
        """Shard s as stored, not decoded (uint16 bfloat16 bits, uint8 float8 codes + their scale):
        for a reader that decodes where the compute is (``decode_maps`` takes GPU tensors)."""
        a, b = self.shard_rows(s)
        return StoredMaps(
            features=self._read_checked("features", a, b),
            features_flip=self._read_checked("features_flip", a, b) if self._has_flip else None,
            scale=self._read_checked("scale", a, b) if _codec.has_scale(self.dtype) else None, dtype=self.dtype)

    def _read_maps(self, a: int, b: int, flip: bool, only_flip: bool = False):
        scale = self._read_checked("scale", a, b) if _codec.has_scale(self.dtype) else None
        feats = None if only_flip else _codec.decode(self._read_checked("features", a, b), self.dtype,
                                                      None if scale is None else scale[:, 0])
        flips = _codec.decode(self._read_checked("features_flip", a, b), self.dtype,
                              None if scale is None else scale[:, 1]) if flip else None
        return feats, flips

    def _read_checked(self, name: str, a: int, b: int, check_rows: bool = True) -> np.ndarray:
        """Stored rows a..b-1 of `name`; a missing or undecodable object is one ChxError naming the image."""
        try:
            raw = self._read_raw(name, a, b)
        except ShardFileError as e:
            row = a if e.row is None else e.row      # the backend makes e.row a store row
            if e.missing:
                raise self._missing_error(name, int(row)) from None
            raise self._undecodable_error(name, int(row), str(e)) from None
        except ChxError:
            raise
        except Exception as e:  # zarr/h5py/codec errors of a damaged object: find the image at fault
            raise self._undecodable_error(name, self._first_bad_row(name, a, b), f"{type(e).__name__}: {e}") from None
        if self._fill_if_missing(name) and b > a:
            flat = raw.reshape(b - a, -1)
            flat = flat.view(np.uint64) if flat.shape[1] * flat.itemsize % 8 == 0 else flat.view(np.uint8)
            for r in np.flatnonzero(~flat.any(axis=1)):   # all zero bits: a real map, or a missing object?
                row = a + int(r)
                if not self._row_done(row) or self._object_missing(name, row):
                    raise self._missing_error(name, row)
        if check_rows and b > a and name in self._checked:
            self._check_rows(name, a, b, raw)
        return raw

    def _check_rows(self, name: str, a: int, b: int, raw: np.ndarray) -> None:
        """Every read of maps: each row against its bound CRC-32C (stores with integrity >= 1: a changed
        byte, a row from another place or store is one ChxError naming the image); older stores,
        which have no per-row checksums: NaN/inf in the maps, the same way."""
        if not self._integrity:
            if name != "scale":
                bad = _codec.nonfinite_rows(raw, self.dtype)
                if bad.any():
                    raise self._nonfinite_error(name, a + int(np.flatnonzero(bad)[0]))
            return
        want = self._row_crcs(a, b)[:, self._checked.index(name)]
        got = _codec.row_crc32c(self._row_bindings(name, a, b), raw)
        if not np.array_equal(want, got):
            row = a + int(np.flatnonzero(want != got)[0])
            if not self._row_done(row):          # written, but its done marker (and checksums) never was
                raise self._missing_error(name, row)
            if name != "scale" and _codec.nonfinite_rows(raw[row - a:row - a + 1], self.dtype)[0]:
                raise self._nonfinite_error(name, row)
            raise ChxError(f"feature store {self.path}: the {name} of {self._where(row)} do not match their checksum "
                           f"(changed since written, or copied from another place or store); {HINT_REPAIR} "
                           f"(`chx store verify {self.path}` lists every damaged shard)")

    def _row_crcs(self, a: int, b: int) -> np.ndarray:
        """uint32 [b - a, checked arrays]: the per-row checksums of rows a..b-1 from their shards' done
        records (cached per shard once the store is complete: then nothing rewrites them)."""
        s0, s1 = int(self.shard_of_row(a)), int(self.shard_of_row(b - 1)) + 1
        cache = self.__dict__.setdefault("_records_cache", {})
        if all(s in cache for s in range(s0, s1)):
            recs = np.stack([cache[s] for s in range(s0, s1)])
        else:
            try:
                recs = self._shard_records(s0, s1)
            except Exception as e:
                raise ChxError(f"feature store {self.path}: the done records of shards {s0}..{s1 - 1} cannot be "
                               f"read ({type(e).__name__}); {HINT_REPAIR}") from None
            if self.complete and not self.writable:
                cache.update({s0 + i: r for i, r in enumerate(recs)})
        per_row = recs[:, len(DONE_FIELDS):].reshape(-1, len(self._checked))   # rows s0*S .. s1*S-1
        return per_row[a - s0 * self.shard_images:b - s0 * self.shard_images]

    def _nonfinite_error(self, name: str, row: int) -> ChxError:
        return ChxError(f"feature store {self.path}: the {name} of {self._where(row)} hold NaN or inf; {HINT_REPAIR} "
                        f"(`chx store verify {self.path}` lists every damaged shard)")

    def _first_bad_row(self, name: str, a: int, b: int) -> int:
        for r in range(a, b):
            try:
                self._read_raw(name, r, r + 1)
            except Exception:
                return r
        return a

    def _row_done(self, row: int) -> bool:
        return bool(self._shard_done_mask()[self.shard_of_row(row)]) if self.is_sharded \
            else bool(self.complete or self._done_units()[row])

    def _where(self, row: int) -> str:
        return f"image {self._image_ids[row]!r} (row {row}, shard {int(self.shard_of_row(row))})"

    def _missing_error(self, name: str, row: int) -> ChxError:
        if not self._row_done(row):
            return ChxError(f"feature store {self.path}: {self._where(row)} is not extracted yet; finish the "
                            f"store with `chx extract-features` (rerun the same command)")
        return ChxError(f"feature store {self.path}: the {name} of {self._where(row)} are missing"
                        f"{' although the store is marked complete' if self.complete else ''}; {HINT_REPAIR}")

    def _undecodable_error(self, name: str, row: int, reason: str) -> ChxError:
        reason = " ".join(reason.split())[:200]
        return ChxError(f"feature store {self.path}: the {name} of {self._where(row)} cannot be read ({reason}); "
                        f"{HINT_REPAIR} (`chx store verify {self.path}` lists every damaged shard)")

    # ------------------------------------------------------------------------------------- writes
    def _require_writable(self, what: str) -> None:
        if not self.writable:
            raise ChxError(f"feature store {self.path} is open read-only; cannot {what} "
                           f"(open it with mode='r+')")

    def _check_maps(self, n: int, features, features_flip) -> tuple[np.ndarray, np.ndarray | None]:
        feats = np.asarray(features)
        shape = (n, *self._feature_shape)
        if feats.shape != shape:
            raise ValueError(f"features have shape {feats.shape}, expected {shape}")
        if self._has_flip and features_flip is None:
            raise ValueError(f"feature store {self.path} holds flipped features: pass features_flip")
        if not self._has_flip and features_flip is not None:
            raise ValueError(f"feature store {self.path} was created without flip: features_flip not allowed")
        flips = None if features_flip is None else np.asarray(features_flip)
        if flips is not None and flips.shape != shape:
            raise ValueError(f"features_flip have shape {flips.shape}, expected {shape}")
        return feats, flips

    def write(self, rows, features, features_flip=None) -> None:
        """Write maps [len(rows), C, H, W] (any float dtype) of store rows, then mark them done.

        Format 1: any rows; maps go first and the done flags second, so a process killed in between
        leaves those images not done (extracted again on resume). Format 2 (sharded): the rows must
        be whole shards (each is passed to :meth:`write_shard`); a part of a shard is refused, since
        writing it would mean a read-modify-write of the shard object."""
        self._require_writable("write features")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        feats, flips = self._check_maps(len(rows), features, features_flip)
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.n_images:
            raise IndexError(f"rows out of range 0..{self.n_images - 1}")
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if np.any(np.diff(rows) == 0):
            raise ValueError("rows must not repeat in one write")
        if self.is_sharded:
            shards, counts = np.unique(self.shard_of_row(rows), return_counts=True)
            for s, k in zip(shards, counts):    # all checked before anything is written
                a, b = self.shard_rows(s)
                if k != b - a:
                    raise ValueError(f"feature store {self.path} is sharded ({self.shard_images} images per "
                                     f"shard): rows {a}..{b - 1} (shard {s}) must be written together, got "
                                     f"{k} of them; buffer a shard's images (ShardBuffer) and call write_shard")
            for s in shards:
                a, b = self.shard_rows(s)
                sel = order[(rows >= a) & (rows < b)]
                self.write_shard(int(s), feats[sel], None if flips is None else flips[sel])
            return
        self._write_rows("features", rows, self._encode(feats[order], rows)[0])
        if flips is not None:
            self._write_rows("features_flip", rows, self._encode(flips[order], rows)[0])
        self._set_done(rows)

    def write_shard(self, s: int, features, features_flip=None) -> None:
        """Write all maps [rows of shard s, C, H, W] (any float dtype; encoded to the store's dtype) of
        shard s at once, then mark it done with its checksums.

        The done marker is removed first and written last, so a writer killed mid-shard leaves the
        shard not done (it is redone on resume); each object is written whole under a temp name and
        renamed (Zarr, local), replaced whole (Zarr through zarr: the old object is deleted first) or
        written into its rows (HDF5), never read back and patched."""
        self._require_writable("write features")
        a, b = self.shard_rows(s)
        feats, flips = self._check_maps(b - a, features, features_flip)
        if not self.is_sharded:
            self.write(np.arange(a, b), feats, flips)
            return
        rows = np.arange(a, b)
        raw, scale = self._encode(feats, rows)
        raw_flip, scale_flip = self._encode(flips, rows) if flips is not None else (None, None)
        scales = None if scale is None else np.stack([scale] + ([scale_flip] if flips is not None else []), axis=1)
        arrays = {"features": raw, "features_flip": raw_flip, "scale": scales}
        head = [1] + [self._shard_crc(name, s, arrays[name]) for name in DONE_FIELDS[1:]]
        rows_crc = np.zeros((self.shard_images if self._integrity else 0, len(self._checked)), dtype=np.uint32)
        for col, name in enumerate(self._checked if self._integrity else ()):
            rows_crc[:b - a, col] = _codec.row_crc32c(self._row_bindings(name, a, b), arrays[name])
        record = np.concatenate([np.asarray(head, dtype=np.uint32), rows_crc.reshape(-1)])[None]
        try:
            self._begin_shard(s)
            self._clear_done(np.array([s]))
            for name in self._checked:
                self._write_shard_raw(name, s, arrays[name])
            self._flush()                      # the data is on disk (or its error raised) before the done marker
            self._set_done(np.array([s]), record)
            self._end_shard(s)
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise ChxError(f"feature store {self.path}: disk full while writing shard {s} (images "
                           f"{self._image_ids[a]!r}..{self._image_ids[b - 1]!r}): {' '.join(str(e).split())[:120]}; "
                           f"free space and rerun the same command: shards written before are kept, this one is "
                           f"checked and redone") from None

    # ------------------------------------------------------------------------ bound checksums, journal
    def _shard_binding(self, name: str, s: int) -> str:
        a, b = self.shard_rows(s)
        return f"{self._fp_tag}|{name}|shard {s}|{self._image_ids[a]}|{self._image_ids[b - 1]}"

    def _row_bindings(self, name: str, a: int, b: int) -> list[str]:
        return [f"{self._fp_tag}|{name}|row {r}|{self._image_ids[r]}" for r in range(a, b)]

    def _shard_crc(self, name: str, s: int, raw: np.ndarray | None) -> int:
        """The checksum of shard s of `name` as its done record holds it: bound to the shard's place
        (store fingerprint, index, image ids) in stores with integrity >= 1, plain CRC-32C before."""
        if self._integrity:
            return _codec.bound_crc32c(self._shard_binding(name, s), raw)
        return _codec.crc32c(raw)

    def _flush(self) -> None:
        """Push written data to the storage (backend; a no-op where each write is already whole)."""

    def _journal(self) -> bool:
        """Single-writer backends (HDF5) write a shard in place: they note it as in flight first."""
        return self.is_sharded and not self.supports_parallel_writers

    def _begin_shard(self, s: int) -> None:
        if self._journal():
            self._set_attrs({"in_flight": [int(s)]})

    def _end_shard(self, s: int) -> None:
        if self._journal():
            self._set_attrs({"in_flight": []})

    def _recover_in_flight(self) -> None:
        """A writer that died mid-shard (a crash, a full disk) left the shard noted in flight: trust
        its done marker only when the shard's data match its checksums, else mark it not done, so
        the next extraction redoes it (opening for writing does this)."""
        if not self._journal():
            return
        pending = self._read_attrs().get("in_flight") or []
        for s in pending:
            s = int(s)
            if 0 <= s < self.n_shards and self._shard_done_mask()[s] and self._shard_problems(s):
                self.mark_shards_missing([s])
        if pending:
            self._set_attrs({"in_flight": []})

    def _shard_problems(self, s: int, records: np.ndarray | None = None) -> list[str]:
        """What is wrong with done shard s: unreadable arrays, checksum mismatches ([] when sound)."""
        a, b = self.shard_rows(s)
        if records is None and self.is_sharded:
            try:
                records = {s: self._shard_records(s, s + 1)[0]}
            except Exception:
                records = {s: np.zeros(self._array_shape("shard_done")[1], dtype=np.uint32)}
        out = []
        if records is not None and records[s][0] != 1:
            return [f"shard {s} has no readable done marker (checksums lost)"]
        for name in self._checked:
            try:
                raw = self._read_checked(name, a, b, check_rows=False)
            except ChxError as e:
                out.append(str(e))
                continue
            self._bytes_read = getattr(self, "_bytes_read", 0) + raw.nbytes
            if records is not None:
                want, got = int(records[s][DONE_FIELDS.index(name)]), self._shard_crc(name, s, raw)
                if want != got:
                    out.append(f"{name} of shard {s} (rows {a}..{b - 1}) changed since it was written, or was "
                               f"copied from another place or store (CRC-32C {got:08x}, written {want:08x})")
                    continue
            bad = _codec.nonfinite_rows(raw, self.dtype) if name != "scale" else \
                ~np.isfinite(raw.reshape(len(raw), -1)).all(axis=1)
            if bad.any():                # older stores, written before NaN was refused at write time
                out.append(f"the {name} of {self._where(a + int(np.flatnonzero(bad)[0]))} hold NaN or inf")
            elif records is not None:
                try:                     # the per-row checksums of the record agree with the data too
                    self._check_rows(name, a, b, raw)
                except ChxError as e:
                    out.append(str(e))
        return out

    def _encode(self, maps: np.ndarray, rows: np.ndarray):
        if self.dtype != "float8":        # float8's encode finds them itself (it cannot scale them)
            bad = ~np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
            if bad.any():
                raise ChxError(f"feature store {self.path}: the maps of image "
                               f"{self._image_ids[int(rows[int(np.flatnonzero(bad)[0])])]!r} hold NaN or inf; a store "
                               f"never keeps them: check the backbone checkpoint (its weights, or --precision)")
        try:
            return _codec.encode(maps, self.dtype)
        except _codec.NonFiniteError as e:
            raise ChxError(f"feature store {self.path}: the maps of image {self._image_ids[int(rows[e.index])]!r} "
                           f"hold NaN or inf, which {self.dtype} cannot store; check the backbone checkpoint, "
                           f"or create the store with --dtype float16") from None

    def mark_shards_missing(self, shards) -> None:
        """Forget that these shards are done (and that the store is complete), so the next
        extraction rewrites them: what ``--repair`` does with :attr:`VerifyReport.bad_shards`."""
        self._require_writable("mark shards missing")
        shards = np.unique(np.asarray(shards, dtype=np.int64).reshape(-1))
        if len(shards) == 0:
            return
        if shards.min() < 0 or shards.max() >= self.n_shards:
            raise IndexError(f"shards out of range 0..{self.n_shards - 1}")
        if self.complete:
            self._set_attrs({"complete": False})
            self._attrs["complete"] = False
        units = shards if self.is_sharded else np.concatenate([np.arange(*self.shard_rows(s)) for s in shards])
        self._clear_done(units)

    def mark_complete(self) -> None:
        """Set the `complete` attribute; only when every shard is done (else ChxError)."""
        self._require_writable("mark it complete")
        missing = len(self.missing_rows())
        if missing:
            raise ChxError(f"feature store {self.path} is incomplete: {missing:,} of {self.n_images:,} "
                           f"images not extracted; rerun `chx extract-features` to finish it")
        self._set_attrs({"complete": True})
        self._attrs["complete"] = True

    def _update_metadata(self, views: list[str], splits: list[str], labels: np.ndarray) -> None:
        """Refresh per-image views/splits and per-study labels (given in store order) where they changed
        (or failed their checksum at open), then their checksums."""
        changes, stale = [], set(self._stale_meta)
        if views != self._views or "view" in stale:
            self._replace_array("view", np.asarray(views, dtype=object))
            self._views, changes = list(views), changes + ["views"]
        if splits != self._splits or "split" in stale:
            self._replace_array("split", np.asarray(splits, dtype=object))
            self._splits, changes = list(splits), changes + ["splits"]
        if not np.array_equal(labels, self._labels, equal_nan=True) or "labels" in stale:
            self._replace_array("labels", np.asarray(labels, dtype=np.float32))
            self._labels, changes = np.asarray(labels, dtype=np.float32).copy(), changes + ["labels"]
        if changes:
            self._store_meta_crc()
        self._stale_meta = []
        self.updated_metadata = changes

    # ------------------------------------------------------------------------------------- reopen
    def _reopen(self, spec: StoreSpec, image_ids, study_ids, views, splits, labels,
                explicit: dict[str, Any]) -> "FeatureStore":
        """Check this (existing) store against what a create_store call asks for; on a match refresh
        views/splits/labels from the inputs and return self, else ChxError listing every difference.
        `explicit`: the layout options the caller set (format_version, shard_images), checked only then."""
        diffs = []
        fd = fingerprint_diff(self.fingerprint, spec.fingerprint)
        if fd:
            diffs.append("fingerprint field(s) differ: " + "; ".join(fd))
        if self.feature_shape != spec.feature_shape:
            diffs.append(f"feature shape {self.feature_shape} in the store vs {spec.feature_shape} now")
        if self.has_flip != spec.flip:
            diffs.append(f"flip={self.has_flip} in the store vs flip={spec.flip} now")
        if self.dtype != spec.dtype:
            diffs.append(f"dtype {self.dtype} in the store vs {spec.dtype} now")
        for key, have in (("format_version", self.format_version), ("shard_images", self.shard_images)):
            if explicit.get(key) is not None and explicit[key] != have:
                diffs.append(f"{key} {have} in the store vs {explicit[key]} now")
        if self.class_names != spec.class_names:
            a, b = self.class_names, spec.class_names
            pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append(f"class list differs ({len(a)} classes in the store vs {len(b)} now; first difference "
                         f"at position {pos}: {a[pos] if pos < len(a) else '<none>'!r} vs "
                         f"{b[pos] if pos < len(b) else '<none>'!r})")
        have, want = set(self.image_ids), set(spec.layout.image_ids)
        rows = None
        if have != want:
            only_store, only_new = have - want, want - have
            parts = []
            if only_store:
                parts.append(f"{len(only_store):,} only in the store (e.g. {_sample(only_store)})")
            if only_new:
                parts.append(f"{len(only_new):,} not in the store (e.g. {_sample(only_new)})")
            diffs.append(f"images differ: {'; '.join(parts)}")
        else:
            rows = self.image_index([str(x) for x in image_ids])
            stored_study = np.repeat(np.asarray(self.study_ids, dtype=object), np.diff(self.study_ptr))
            moved = [str(image_ids[j]) for j, r in enumerate(rows) if stored_study[r] != str(study_ids[j])]
            if moved:
                diffs.append(f"images differ: {len(moved):,} belong to another study now (e.g. {_sample(moved)})")
        if diffs:
            raise ChxError(f"feature store {self.path} was made differently: {' | '.join(diffs)}; "
                           f"use --overwrite to replace it (or choose another store path)")
        # Same images and studies: bring views/splits/labels to store order and refresh any that changed.
        new_views = [""] * self.n_images
        new_splits = [""] * self.n_images
        for r, v, s in zip(rows, _as_str_list(views), _as_str_list(splits)):
            new_views[r], new_splits[r] = v, s
        lab = np.asarray(labels, dtype=np.float32)
        study_row = {sid: i for i, sid in enumerate(self.study_ids)}
        new_labels = np.empty_like(self.labels)
        for j, sid in enumerate(study_ids):
            new_labels[study_row[str(sid)]] = lab[j]
        self._update_metadata(new_views, new_splits, new_labels)
        return self

    # ------------------------------------------------------------------------------------- verify
    def verify(self) -> VerifyReport:
        """Read every done shard back (every array), check its stored CRC-32C checksums (format 2;
        bound to the shard's place and, row by row, to each image's in stores with integrity >= 1)
        and report what is missing, undecodable, changed, moved or NaN. Never raises for a damaged shard."""
        t0 = time.perf_counter()
        done = self._shard_done_mask()
        records = self._readable_records() if self.is_sharded else None
        report = VerifyReport(self.path, self.n_shards, 0, records is not None, self.complete,
                              not_extracted=[int(s) for s in np.flatnonzero(~done)], bound=bool(self._integrity))
        self._bytes_read = 0
        for s in np.flatnonzero(done):
            a, b = self.shard_rows(s)
            report.checked += 1
            for problem in self._shard_problems(int(s), records):
                report.problems.append(ShardProblem(int(s), (a, b), self._image_ids[a], problem))
        report.bytes_read = self._bytes_read
        report.seconds = time.perf_counter() - t0
        return report

    def _readable_records(self) -> np.ndarray:
        """All done records; a damaged one reads as zeros (verify then reports its checksums lost)."""
        try:
            return self._shard_records(0, self.n_shards)
        except Exception:
            out = np.zeros((self.n_shards, self._array_shape("shard_done")[1]), dtype=np.uint32)
            for s in range(self.n_shards):
                try:
                    out[s] = self._shard_records(s, s + 1)[0]
                except Exception:
                    pass
            return out

    # ---------------------------------------------------------------------------------- reporting
    def info(self) -> dict[str, Any]:
        """Figures for `chx store info`: layout, dtype, bytes per image, sizes (real on disk as `du`
        counts them, and logical), objects, progress."""
        done = int(self.done.sum())
        counts = np.diff(self._study_ptr)
        vals, freq = np.unique(counts, return_counts=True)
        on_disk, logical, files = self._disk_usage()
        feat_disk = self.feature_bytes_on_disk()
        stored = done * self.stored_bytes_per_image      # maps written so far, as stored before compression
        return {
            "path": self.path, "backend": self.backend, "format_version": self.format_version,
            "layout": (f"sharded: {self.shard_images} images per shard object" if self.is_sharded
                       else "one object per image (format 1)"),
            "shard_images": self.shard_images, "shards": self.n_shards,
            "missing_shards": int(len(self.missing_shards())),
            "shards_without_objects": int(len(self.shards_without_objects())),
            "images": self.n_images, "studies": self.n_studies,
            "views_per_study": {int(v): int(f) for v, f in zip(vals, freq)},
            "splits": dict(Counter(self.study_splits)), "split_images": dict(Counter(self._splits)),
            "feature_shape": list(self._feature_shape), "dtype": self.dtype, "flip": self._has_flip,
            "compressed": self.compressed, "checksums": _codec.CHECKSUM if self.is_sharded else None,
            "bytes_per_image": self.stored_bytes_per_image, "bytes_per_image_decoded": self.nbytes_per_image,
            "bytes_on_disk": on_disk, "bytes_logical": logical, "files": files,
            "files_per_image": (files / self.n_images) if files else None,
            "bytes_uncompressed": stored,
            "bytes_projected": projected_size(self.n_images, self._feature_shape, self._has_flip, self.dtype),
            "feature_bytes_on_disk": feat_disk,
            "compression_ratio": (stored / feat_disk) if feat_disk and stored else None,
            "fingerprint": self.fingerprint, "class_names": self.class_names,
            "done": done, "complete": self.complete,
        }

    # ---------------------------------------------------------------------------- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<FeatureStore {self.backend} v{self.format_version} {self.path!r} mode={self.mode!r} "
                f"images={self.n_images} studies={self.n_studies} shape={self._feature_shape} {self.dtype}>")
