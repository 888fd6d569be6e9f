"""HDF5 backend: the whole store in one file (path ending .h5/.hdf5), one writer at a time.

HDF5 files take a single writer (h5py, no MPI): `supports_parallel_writers` is False and callers
must not shard extraction into one. Attributes are stored as JSON strings.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from chx.errors import ChxError
from chx.store._base import (FEATURE_DTYPE, FORMAT_VERSION, HINT_RECREATE, REQUIRED_ARRAYS, REQUIRED_ATTRS,
                             FeatureStore, Layout, contiguous_runs, local_path)

META_CHUNK = 65536
# lzf (+ byte shuffle, which groups the float16 high/low bytes) decompresses far faster than gzip
# for random study reads; it ships with h5py.
COMPRESSION = {"compression": "lzf", "shuffle": True}   # only with compress=True


def h5_path(path: str) -> Path:
    local = local_path(path)
    if local is None:
        raise ChxError(f"{path}: an HDF5 feature store must be a local file; use a Zarr store "
                       f"(a path not ending in .h5) for URLs")
    return local


class HDF5FeatureStore(FeatureStore):
    backend = "hdf5"
    supports_parallel_writers = False

    def __init__(self, path: str, mode: str = "r"):
        import h5py

        local = h5_path(path)
        if not local.exists():
            raise ChxError(f"no feature store at {path}; check the path or create it with `chx extract-features`")
        if local.is_dir():
            raise ChxError(f"{path} is a directory, not an HDF5 feature store file")
        self._file = None
        try:
            self._file = h5py.File(local, "r" if mode == "r" else "r+")
        except OSError as e:
            hint = "is another process writing it? HDF5 takes one writer" if "unable to lock" in str(e).lower() \
                else f"truncated or not HDF5? {HINT_RECREATE}"
            raise ChxError(f"cannot open HDF5 feature store {path} ({e}); {hint}") from None
        self._local = local
        try:
            attrs = self._read_attrs()
        except Exception as e:
            self.close()
            raise ChxError(f"HDF5 feature store {path} has unreadable attributes ({e}); {HINT_RECREATE}") from None
        missing = [a for a in REQUIRED_ATTRS if a not in attrs]
        names = list(REQUIRED_ARRAYS) + (["features_flip"] if attrs.get("flip") else [])
        missing_ds = [d for d in names if d not in self._file]
        if missing or missing_ds:
            self.close()
            raise ChxError(f"{path} is not a chx feature store, or its creation was interrupted "
                           f"(missing: {', '.join(missing + missing_ds)}); {HINT_RECREATE}")
        if int(attrs["format_version"]) > FORMAT_VERSION:
            self.close()
            raise ChxError(f"feature store {path} has format version {attrs['format_version']}, newer than this "
                           f"chx reads ({FORMAT_VERSION}); upgrade chx")
        self._ds = {n: self._file[n] for n in names}
        try:
            super().__init__(path, mode)
        except BaseException:
            self.close()
            raise

    def _read_attrs(self) -> dict:
        return {k: json.loads(self._file.attrs[k]) for k in self._file.attrs.keys()}

    def _set_attrs(self, attrs: dict) -> None:
        for k, v in attrs.items():
            self._file.attrs[k] = json.dumps(v)
        self._file.flush()

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

    def _read_slice(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._ds[name][start:stop]

    def _write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        ds = self._ds[name]
        for a, b, off in contiguous_runs(rows):
            ds[a:b] = values[off:off + (b - a)]

    def _set_done(self, rows: np.ndarray) -> None:
        ds = self._ds["done"]
        for a, b, _ in contiguous_runs(rows):
            ds[a:b] = 1
        self._file.flush()

    def _read_done(self) -> np.ndarray:
        return self._ds["done"][...] != 0

    def bytes_on_disk(self) -> int | None:
        return os.path.getsize(self._local)

    def feature_bytes_on_disk(self) -> int | None:
        return sum(int(self._ds[n].id.get_storage_size()) for n in ("features", "features_flip") if n in self._ds)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None


def probe(path: str) -> tuple[str, str]:
    local = h5_path(path)
    if not local.exists():
        return "absent", ""
    if local.is_dir():
        return "foreign", f"{path} is a directory"
    try:
        HDF5FeatureStore(path, "r").close()
        return "store", ""
    except ChxError as e:
        return "invalid", str(e)


def create(path: str, layout: Layout, class_names, feature_shape, fingerprint, flip: bool, replace: bool,
           compress: bool = False) -> bool:
    """Write the file under a temp name beside the target, then move it into place; False when another
    process created the target first (not replace)."""
    import h5py

    local = h5_path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.tmp-{uuid.uuid4().hex[:12]}"
    n, s, k = layout.n_images, len(layout.study_ids), len(class_names)
    mc = lambda m: (max(1, min(m, META_CHUNK)),)  # noqa: E731
    try:
        with h5py.File(tmp, "w") as f:
            for name in ["features"] + (["features_flip"] if flip else []):
                f.create_dataset(name, shape=(n, *feature_shape), dtype=FEATURE_DTYPE, chunks=(1, *feature_shape),
                                 fillvalue=0, **(COMPRESSION if compress else {}))
            f.create_dataset("done", shape=(n,), dtype="uint8", chunks=mc(n), fillvalue=0)
            sdt = h5py.string_dtype("utf-8")
            for name, values in (("image_id", layout.image_ids), ("view", layout.views),
                                 ("split", layout.splits), ("study_id", layout.study_ids)):
                f.create_dataset(name, data=np.asarray(values, dtype=object), dtype=sdt, chunks=mc(len(values)),
                                 **COMPRESSION)
            f.create_dataset("study_ptr", data=layout.study_ptr, dtype="int64")
            f.create_dataset("labels", data=layout.labels, dtype="float32", chunks=(mc(s)[0], max(k, 1)))
            attrs = {"class_names": class_names, "fingerprint": fingerprint, "feature_shape": list(feature_shape),
                     "flip": bool(flip), "complete": False, "format_version": FORMAT_VERSION}  # version last
            for key, v in attrs.items():
                f.attrs[key] = json.dumps(v)
        if replace:
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
