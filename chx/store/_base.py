"""The feature store class: :class:`FeatureStore` with its backend contract, layout properties and
shard arithmetic; its other parts are mixins, one module each: open-time checks (``_checks``),
checked reads and bound checksums (``_integrity``), public reads (``_read``), writes and the
reopen check (``_write``); ``verify`` and ``info`` live in ``_report``, shared constants and
helpers in ``_common``.

The backend contract: a backend subclasses :class:`FeatureStore`, says whether it takes parallel
writers (``supports_parallel_writers``), implements the classmethods ``probe`` (what a path holds
now) and ``create`` (a new store from a :class:`StoreSpec`), and the primitives marked "backend"
below (open, attributes, whole small arrays, raw rows of the feature arrays, done markers, disk
usage). Everything else (checks, dtype encoding, checksums, the shard API, reads with their error
reports, verify, info, the reopen check) is written once, in the mixins.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from chx.errors import ChxError
from chx.store import _codec, _report
from chx.store._checks import OpenChecks
from chx.store._common import projected_size
from chx.store._integrity import Integrity
from chx.store._layout import LEGACY_SHARD_IMAGES, StoreSpec
from chx.store._read import Reading
from chx.store._write import Writing


class FeatureStore(OpenChecks, Integrity, Reading, Writing):
    """A chx feature store: images ordered by study (CSR), feature maps in shards, a done marker per shard.

    Open one with :func:`chx.store.open_store` or :func:`chx.store.create_store`; the two backends
    (Zarr directory, HDF5 file) share this interface. Small metadata (ids, views, splits, labels,
    study pointers) is read once at open; maps and done markers are read on demand.

    Shards: store rows [s*S, min((s+1)*S, n)) form shard s (S = ``shard_images``). A writer owns
    whole shards (:meth:`shards_for_writer`) and writes each at once (:meth:`write_shard`), which
    marks it done as one unit.

    Format 1 (older stores: one object per image, a done flag per image, float16, no checksums) is
    read through the same API, blocks of 64 rows standing in for shards. chx no longer writes it:
    create_store refuses to reopen one for writing (extract-features: "re-create it with
    --overwrite") unless format_version=1 is asked for explicitly, which only tests of older stores
    do; such a store also takes :meth:`write` of any rows.
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

    # ------------------------------------------------------------------ backend contract (overridden)
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

    # ------------------------------------------------------------------------------------- properties
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
    def _done_array(self) -> str:
        """Where the done markers are: ``shard_done`` (a record per shard) or, format 1, ``done`` (a flag per row)."""
        return "shard_done" if self.is_sharded else "done"

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
        """Read fresh (another process may mark it); a read-only handle keeps a True it has seen, as it
        keeps the done records then (nothing rewrites a complete store's shards: on object storage
        each read would otherwise cost two requests for the attributes)."""
        if not self.writable and (self.__dict__.get("_seen_complete") or self.__dict__.get("_attrs", {}).get("complete")):
            return True
        done = bool(self._read_attrs().get("complete", False))
        if done and not self.writable:
            self._seen_complete = True
        return done

    # ----------------------------------------------------------------------------------------- shards
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

    # ------------------------------------------------------------------------------------------ reports
    def verify(self) -> _report.VerifyReport:
        """Every done shard read back and checked: :func:`chx.store._report.verify`."""
        return _report.verify(self)

    def info(self) -> dict[str, Any]:
        """Figures for `chx store info`: :func:`chx.store._report.info`."""
        return _report.info(self)

    # ---------------------------------------------------------------------------------- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<FeatureStore {self.backend} v{self.format_version} {self.path!r} mode={self.mode!r} "
                f"images={self.n_images} studies={self.n_studies} shape={self._feature_shape} {self.dtype}>")
