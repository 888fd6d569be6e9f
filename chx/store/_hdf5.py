"""HDF5 backend: the whole store in one file (path ending .h5/.hdf5), one writer at a time.

HDF5 files take a single writer (h5py, no MPI): `supports_parallel_writers` is False, and
`shards_for_writer(i, n)` refuses n > 1. Format 2 keeps one HDF5 chunk per image and groups rows
into shards of S images only for writing, the done markers (``shard_done``) and checksums, so
extraction runs one code path on both backends. Attributes are stored as JSON strings. The file
starts with a 512-byte HDF5 user block that holds :data:`MAGIC`, so a chx store stays provably
chx's even when the HDF5 structure behind it is truncated or damaged.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import uuid
from pathlib import Path

import numpy as np

from chx.errors import ChxError
from chx.store import _codec
from chx.store._base import FeatureStore
from chx.store._common import HINT_RECREATE, contiguous_runs, is_provably_ours, local_path
from chx.store._layout import StoreSpec

META_CHUNK = 65536
USERBLOCK = 512
MAGIC = b"chx feature store (HDF5)\n"
# lzf (+ byte shuffle, which groups the float16 high/low bytes) decompresses far faster than gzip
# for random study reads; it ships with h5py.
COMPRESSION = {"compression": "lzf", "shuffle": True}   # only with compress=True


def h5_path(path: str) -> Path:
    local = local_path(path)
    if local is None:
        raise ChxError(f"{path}: an HDF5 feature store must be a local file; use a Zarr store "
                       f"(a path not ending in .h5) for URLs")
    return local


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class HDF5FeatureStore(FeatureStore):
    backend = "hdf5"
    supports_parallel_writers = False

    # ----------------------------------------------------------------------------------- contract
    @classmethod
    def probe(cls, path: str) -> tuple[str, str]:
        local = h5_path(path)
        if not local.exists():
            return "absent", ""
        if local.is_dir():
            return "foreign", f"{path} is a directory"
        if _busy(local):
            return "busy", "another process has it open (an extraction writing it, or a reader)"
        try:
            cls(path, "r", refresh_meta=True).close()   # views/splits/labels: a rerun rewrites them
            state, reason = "store", ""
        except ChxError as e:
            state, reason = "damaged", str(e)
        if state == "damaged" and not (_has_magic(local) or is_provably_ours(_attrs_if_readable(local))):
            return "foreign", "it is not a file chx made (no chx header, no chx attributes)"
        alien = sorted(set(_root_keys(local)) - OWNED_ENTRIES)
        if alien:    # a dataset or group a user added: --overwrite would delete it
            more = ", ..." if len(alien) > 3 else ""
            return "foreign", f"it holds entries chx did not make: {', '.join(alien[:3])}{more}"
        return state, reason

    @classmethod
    def create(cls, path: str, spec: StoreSpec, replace: bool) -> bool:
        """Write the file under a temp name beside the target, then move it into place."""
        import h5py

        local = h5_path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{local.name}.tmp-{uuid.uuid4().hex[:12]}"
        lay, (c, h, w) = spec.layout, spec.feature_shape
        n, s, k = lay.n_images, len(lay.study_ids), len(spec.class_names)
        mc = lambda m: (max(1, min(m, META_CHUNK)),)  # noqa: E731
        try:
            with h5py.File(tmp, "w", userblock_size=USERBLOCK) as f:
                for name in spec.feature_arrays:
                    f.create_dataset(name, shape=(n, c, h, w), dtype=_codec.STORED_NUMPY[spec.dtype],
                                     chunks=(1, c, h, w), fillvalue=0, **(COMPRESSION if spec.compress else {}))
                if spec.format_version >= 2:
                    if _codec.has_scale(spec.dtype):
                        nf = len(spec.feature_arrays)
                        f.create_dataset("scale", shape=(n, nf, c), dtype="float32",
                                         chunks=(min(n, spec.shard_images), nf, c), fillvalue=0)
                    width = spec.done_record_width
                    f.create_dataset("shard_done", shape=(spec.n_shards, width), dtype="uint32",
                                     chunks=(min(spec.n_shards, max(1, 2**16 // width)), width), fillvalue=0)
                else:
                    f.create_dataset("done", shape=(n,), dtype="uint8", chunks=mc(n), fillvalue=0)
                sdt = h5py.string_dtype("utf-8")
                for name, values in (("image_id", lay.image_ids), ("view", lay.views),
                                     ("split", lay.splits), ("study_id", lay.study_ids)):
                    f.create_dataset(name, data=np.asarray(values, dtype=object), dtype=sdt,
                                     chunks=mc(len(values)), **COMPRESSION)
                f.create_dataset("study_ptr", data=lay.study_ptr, dtype="int64")
                f.create_dataset("labels", data=lay.labels, dtype="float32", chunks=(mc(s)[0], max(k, 1)))
                for key, v in spec.attrs().items():   # format_version last
                    f.attrs[key] = json.dumps(v)
            with open(tmp, "r+b") as f:
                f.write(MAGIC)
            if replace:
                with _exclusive(local, path):   # the writers' lock: never replace a file being written
                    os.replace(tmp, local)
                return True
            try:
                os.link(tmp, local)          # exclusive: fails if another process put a store there first
            except FileExistsError:
                return False
            except OSError:                  # filesystem without hard links
                if local.exists():
                    return False
                os.replace(tmp, local)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------- primitives
    def _open(self, mode: str) -> None:
        import h5py

        local = h5_path(self.path)
        self._file = None
        if not local.exists():
            raise ChxError(f"no feature store at {self.path}; check the path or create it with `chx extract-features`")
        if local.is_dir():
            raise ChxError(f"{self.path} is a directory, not an HDF5 feature store file")
        try:
            self._file = h5py.File(local, "r" if mode == "r" else "r+")
        except OSError as e:
            hint = ("another process has it open (HDF5 takes one writer, and no reader while it writes): wait "
                    "for that process to finish, then rerun") if "unable to lock" in str(e).lower() \
                else f"truncated or not HDF5? {HINT_RECREATE}"
            raise ChxError(f"cannot open HDF5 feature store {self.path} ({e}); {hint}") from None
        self._local = local
        self._ds: dict = {}

    def _read_attrs(self) -> dict:
        try:
            return {k: json.loads(self._file.attrs[k]) for k in self._file.attrs.keys()}
        except Exception as e:
            raise ChxError(f"HDF5 feature store {self.path} has unreadable attributes ({e}); {HINT_RECREATE}") from None

    def _set_attrs(self, attrs: dict) -> None:
        for k, v in attrs.items():
            self._file.attrs[k] = json.dumps(v)
        self._file.flush()

    def _flush(self) -> None:
        self._file.flush()

    def _open_arrays(self, names: list[str]) -> None:
        missing = [d for d in names if d not in self._file]
        if missing:
            raise ChxError(f"{self.path} is not a chx feature store, or its creation was interrupted "
                           f"(missing: {', '.join(missing)}); {HINT_RECREATE}")
        self._ds = {n: self._file[n] for n in names}

    def _array_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._ds[name].shape)

    def _array_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._ds[name].dtype)

    def _read_array(self, name: str) -> np.ndarray:
        ds = self._ds[name]
        try:
            if ds.dtype.kind == "O":
                return ds.asstr()[...]
            return ds[...]
        except Exception as e:
            raise ChxError(f"feature store {self.path}: cannot read {name!r} ({e}); {HINT_RECREATE}") from None

    def _replace_array(self, name: str, values: np.ndarray) -> None:
        self._ds[name][...] = values
        self._file.flush()

    @property
    def compressed(self) -> bool:
        return self._ds["features"].compression is not None

    def _read_raw(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._ds[name][start:stop]

    def _fill_if_missing(self, name: str) -> bool:
        return True      # rows never written read back as zeros

    def _object_missing(self, name: str, row: int) -> bool:
        return False     # one file: a done row is always allocated

    def _missing_objects(self) -> dict[str, np.ndarray]:
        return {}

    def _write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        ds = self._ds[name]
        for a, b, off in contiguous_runs(rows):
            ds[a:b] = values[off:off + (b - a)]

    def _write_shard_raw(self, name: str, shard: int, values: np.ndarray) -> None:
        a, b = self.shard_rows(shard)
        self._ds[name][a:b] = values

    def _done_units(self) -> np.ndarray:
        if self.is_sharded:
            return self._ds["shard_done"][:, 0] != 0
        return self._ds["done"][...] != 0

    def _set_done(self, units: np.ndarray, records: np.ndarray | None = None) -> None:
        if self.is_sharded:
            for s, rec in zip(units, records):
                self._ds["shard_done"][int(s)] = rec
        else:
            for a, b, _ in contiguous_runs(np.sort(units)):
                self._ds["done"][a:b] = 1
        self._file.flush()

    def _clear_done(self, units: np.ndarray) -> None:
        ds = self._ds[self._done_array]
        for a, b, _ in contiguous_runs(np.sort(units)):
            ds[a:b] = 0
        self._file.flush()

    def _shard_records(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._ds["shard_done"][start:stop], dtype=np.uint32)

    def _disk_usage(self):
        st = os.stat(self._local)
        return st.st_blocks * 512, st.st_size, 1

    def feature_bytes_on_disk(self) -> int | None:
        return sum(int(self._ds[n].id.get_storage_size()) for n in ("features", "features_flip", "scale")
                   if n in self._ds)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None


# Every entry chx puts at an HDF5 store's root; anything else there is the user's.
OWNED_ENTRIES = frozenset(("features", "features_flip", "scale", "shard_done", "done", "image_id", "view",
                           "split", "study_id", "study_ptr", "labels"))


def _root_keys(path: Path) -> list[str]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return list(f.keys())
    except Exception:
        return []


def _busy(path: Path) -> bool:
    """Whether another process holds the file open (HDF5 locks it with flock while open)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)


class _exclusive:
    """Hold HDF5's own file lock (flock) exclusively while the file is replaced: refused (ChxError)
    while another process - an extraction writing it, a reader - has it open."""

    def __init__(self, local: Path, path: str):
        self.local, self.path, self.fd = local, path, None

    def __enter__(self):
        try:
            self.fd = os.open(self.local, os.O_RDONLY)
        except FileNotFoundError:
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise ChxError(f"feature store {self.path} is open in another process (an extraction writing it, or "
                           f"a reader); --overwrite never replaces a store in use: wait for that process to "
                           f"finish (or stop it), then rerun") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def _attrs_if_readable(path: Path) -> dict:
    """The file's root attributes (raw, undecoded) when h5py can open it; {} otherwise."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except Exception:
        return {}
