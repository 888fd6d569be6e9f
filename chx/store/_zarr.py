"""Zarr v3 backend: a directory (local path) or any fsspec URL (memory://, s3://, file://...).

Every image is its own chunk of `features` (and `features_flip`, `done`), so processes writing
disjoint images never touch the same object: shard-parallel extraction into one store is safe.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from chx.errors import ChxError
from chx.store._base import (FEATURE_DTYPE, FORMAT_VERSION, HINT_RECREATE, REQUIRED_ARRAYS, REQUIRED_ATTRS,
                             FeatureStore, Layout, contiguous_runs, local_path)

META_CHUNK = 65536                     # elements per chunk of the small per-image/per-study arrays
KEY_ENCODING = {"name": "default", "separator": "/"}   # chunk i of `done` is the key done/c/i


def _make_store(path: str, read_only: bool):
    from zarr.storage import FsspecStore, LocalStore

    local = local_path(path)
    if local is not None:
        return LocalStore(local, read_only=read_only)
    try:
        return FsspecStore.from_url(str(path), read_only=read_only)
    except ImportError as e:
        raise ChxError(f"feature store {path}: URLs need fsspec (and the filesystem's package, e.g. "
                       f"s3fs): {e}; install it or use a local path") from None
    except ValueError as e:
        raise ChxError(f"feature store {path}: cannot open this URL ({e}); check the path") from None


def _open_group(store, path: str, mode: str):
    import zarr

    try:
        return zarr.open_group(store=store, mode=mode)
    except FileNotFoundError:
        if local_path(path) is not None:   # the folder exists (checked before): it lacks zarr.json
            raise ChxError(f"{path} is not a chx feature store (no zarr.json: not a Zarr group, or its "
                           f"metadata was deleted); check the path or {HINT_RECREATE}") from None
        raise ChxError(f"no feature store at {path} (no Zarr group there); check the path or create it "
                       f"with `chx extract-features`") from None
    except Exception as e:  # zarr raises several types for broken metadata (JSON, ValueError, ...)
        raise ChxError(f"{path} is not a readable Zarr feature store ({type(e).__name__}: {e}); "
                       f"{HINT_RECREATE}") from None


class ZarrFeatureStore(FeatureStore):
    backend = "zarr"
    supports_parallel_writers = True

    def __init__(self, path: str, mode: str = "r"):
        local = local_path(path)
        if local is not None and not local.exists():
            raise ChxError(f"no feature store at {path}; check the path or create it with `chx extract-features`")
        if local is not None and not local.is_dir():
            raise ChxError(f"{path} is a file, not a Zarr feature store (a directory); for an HDF5 store "
                           f"name the file *.h5")
        self._local = local
        self._zstore = _make_store(path, read_only=(mode == "r"))
        self._group = _open_group(self._zstore, path, "r" if mode == "r" else "r+")
        self._arrays: dict = {}
        attrs = self._group.attrs.asdict()
        missing = [a for a in REQUIRED_ATTRS if a not in attrs]
        if missing:
            raise ChxError(f"{path} is not a chx feature store, or its creation was interrupted "
                           f"(attribute(s) {', '.join(missing)} missing); {HINT_RECREATE}")
        if int(attrs["format_version"]) > FORMAT_VERSION:
            raise ChxError(f"feature store {path} has format version {attrs['format_version']}, newer than this "
                           f"chx reads ({FORMAT_VERSION}); upgrade chx")
        names = list(REQUIRED_ARRAYS) + (["features_flip"] if attrs.get("flip") else [])
        for name in names:
            try:
                self._arrays[name] = self._group[name]
            except Exception as e:  # KeyError, or broken array metadata
                raise ChxError(f"feature store {path} is damaged: array {name!r} cannot be opened "
                               f"({type(e).__name__}: {e}); {HINT_RECREATE}") from None
        n = self._arrays["features"].shape[0]
        expect = (n, *(int(s) for s in attrs["feature_shape"]))
        for name in names:
            shape = self._arrays[name].shape
            if name in ("features", "features_flip") and shape != expect:
                raise ChxError(f"feature store {path} is damaged: {name} has shape {shape}, expected {expect}; "
                               f"{HINT_RECREATE}")
            if name in ("image_id", "view", "split", "done") and shape != (n,):
                raise ChxError(f"feature store {path} is damaged: {name} has shape {shape}, expected ({n},); "
                               f"{HINT_RECREATE}")
        super().__init__(path, mode)

    # ----------------------------------------------------------------------------------- primitives
    def _read_attrs(self) -> dict:
        # Re-read the group metadata: another process may have marked the store complete.
        import zarr

        try:
            return zarr.open_group(store=self._zstore, mode="r").attrs.asdict()
        except Exception as e:
            raise ChxError(f"feature store {self.path}: cannot read its attributes ({e}); {HINT_RECREATE}") from None

    def _set_attrs(self, attrs: dict) -> None:
        self._group.attrs.update(attrs)

    def _read_array(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name][...]
        except Exception as e:
            raise ChxError(f"feature store {self.path}: cannot read {name!r} ({type(e).__name__}: {e}); "
                           f"{HINT_RECREATE}") from None

    def _replace_array(self, name: str, values: np.ndarray) -> None:
        self._arrays[name][...] = values

    def _read_slice(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._arrays[name][start:stop]

    def _write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        arr = self._arrays[name]
        runs = contiguous_runs(rows)
        if len(runs) == 1:
            arr[runs[0][0]:runs[0][1]] = values
        else:  # one call, so zarr writes the (separate) chunks concurrently
            arr.oindex[(rows,) + (slice(None),) * (values.ndim - 1)] = values

    def _set_done(self, rows: np.ndarray) -> None:
        arr = self._arrays["done"]
        runs = contiguous_runs(rows)
        if len(runs) == 1:
            arr[runs[0][0]:runs[0][1]] = 1
        else:
            arr.oindex[rows] = np.ones(len(rows), dtype=np.uint8)

    def _read_done(self) -> np.ndarray:
        n = self._arrays["done"].shape[0]
        if self._read_attrs().get("complete"):
            return np.ones(n, dtype=bool)
        listed = self._done_from_listing(n)
        if listed is not None:
            return listed
        return np.asarray(self._arrays["done"][...]) != 0

    def _done_from_listing(self, n: int) -> np.ndarray | None:
        """`done` has one chunk per image and only ever receives 1s (never the fill value 0), so an image
        is done exactly when its chunk object exists: listing keys beats reading n tiny objects."""
        arr = self._arrays["done"]
        enc = arr.metadata.chunk_key_encoding
        if tuple(arr.chunks) != (1,) or getattr(enc, "separator", None) != "/" \
                or type(enc).__name__ != "DefaultChunkKeyEncoding":
            return None
        try:
            if self._local is not None:
                try:
                    names = [e.name for e in os.scandir(self._local / "done" / "c")]
                except FileNotFoundError:
                    names = []
            else:
                from zarr.core.sync import sync  # zarr's own bridge to its async store API

                async def keys():
                    return [k async for k in self._zstore.list_prefix("done/c/")]

                names = [k.rsplit("/", 1)[-1] for k in sync(keys())]
        except Exception:
            return None
        out = np.zeros(n, dtype=bool)
        idx = [int(s) for s in names if s.isdigit()]   # skips a writer's leftover *.partial temp files
        if idx:
            idx_arr = np.asarray(idx, dtype=np.int64)
            out[idx_arr[idx_arr < n]] = True
        return out

    def bytes_on_disk(self) -> int | None:
        return None if self._local is None else _du(self._local)

    def feature_bytes_on_disk(self) -> int | None:
        if self._local is None:
            return None
        return sum(_du(self._local / n) for n in ("features", "features_flip") if n in self._arrays)

    def close(self) -> None:
        try:
            self._zstore.close()
        except Exception:
            pass


def _du(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------------------ creation
def probe(path: str) -> tuple[str, str]:
    """('store'|'absent'|'invalid'|'foreign', reason) for what `path` holds now."""
    try:
        ZarrFeatureStore(path, "r").close()
        return "store", ""
    except ChxError as e:
        reason = str(e)
    local = local_path(path)
    if local is not None:
        if not local.exists():
            return "absent", ""
        if local.is_dir() and not any(local.iterdir()):
            return "absent", ""
        if local.is_dir() and any((local / n).exists() for n in ("zarr.json",) + REQUIRED_ARRAYS):
            return "invalid", reason   # a damaged or half-made Zarr store: --overwrite may replace it
        return "foreign", reason
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        if not fs.exists(root):
            return "absent", ""
        if fs.exists(root.rstrip("/") + "/zarr.json"):
            return "invalid", reason
        if fs.isdir(root) and not fs.ls(root):
            return "absent", ""
    except Exception:
        pass
    return "foreign", reason


def _populate(store, layout: Layout, class_names: list[str], feature_shape, fingerprint: dict, flip: bool,
              compress: bool = False) -> None:
    """Write a new store's arrays, then its attributes in one final metadata write (format_version
    with them), so an interrupted creation never looks like a valid store."""
    import zarr

    n, s, k = layout.n_images, len(layout.study_ids), len(class_names)
    g = zarr.open_group(store=store, mode="w")
    mc = lambda m: (max(1, min(m, META_CHUNK)),)  # noqa: E731
    for name in ["features"] + (["features_flip"] if flip else []):
        g.create_array(name, shape=(n, *feature_shape), dtype=FEATURE_DTYPE, chunks=(1, *feature_shape),
                       fill_value=0, chunk_key_encoding=KEY_ENCODING,
                       compressors="auto" if compress else None)   # "auto": zarr's default, zstd
    g.create_array("done", shape=(n,), dtype="uint8", chunks=(1,), fill_value=0, chunk_key_encoding=KEY_ENCODING,
                   compressors=None)
    for name, values, count in (("image_id", layout.image_ids, n), ("view", layout.views, n),
                                ("split", layout.splits, n), ("study_id", layout.study_ids, s)):
        a = g.create_array(name, shape=(count,), dtype=str, chunks=mc(count), chunk_key_encoding=KEY_ENCODING)
        a[...] = np.asarray(values, dtype=object)
    a = g.create_array("study_ptr", shape=(s + 1,), dtype="int64", chunks=(s + 1,), chunk_key_encoding=KEY_ENCODING)
    a[...] = layout.study_ptr
    a = g.create_array("labels", shape=(s, k), dtype="float32", chunks=(mc(s)[0], max(k, 1)),
                       fill_value=float("nan"), chunk_key_encoding=KEY_ENCODING)
    a[...] = layout.labels
    g.attrs.update({"class_names": class_names, "fingerprint": fingerprint, "feature_shape": list(feature_shape),
                    "flip": bool(flip), "complete": False, "format_version": FORMAT_VERSION})


def create(path: str, layout: Layout, class_names, feature_shape, fingerprint, flip: bool, replace: bool,
           compress: bool = False) -> bool:
    """Create a store at path; False when another process created one there first (not replace)."""
    local = local_path(path)
    if local is None:
        # Object storage has no rename: the attributes (format_version among them) are written last.
        _populate(_make_store(path, read_only=False), layout, class_names, feature_shape, fingerprint, flip, compress)
        return True
    # Local: build beside the target under a temp name, then rename it into place.
    local.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = local.parent / f".{local.name}.tmp-{tag}"
    try:
        from zarr.storage import LocalStore

        _populate(LocalStore(tmp), layout, class_names, feature_shape, fingerprint, flip, compress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace and local.exists() and any(local.iterdir()):
        old = local.parent / f".{local.name}.old-{tag}"
        os.rename(local, old)
        os.rename(tmp, local)
        shutil.rmtree(old, ignore_errors=True)
        return True
    try:
        os.rename(tmp, local)   # replaces an empty directory; fails on a non-empty one
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True
