"""Zarr v3 backend: a directory (local path) or any fsspec URL (memory://, s3://, file://...).

Format 2 (new stores): ``features`` (and ``features_flip``, and float8's ``scale``) use Zarr's
sharding codec: one object per shard of S consecutive store rows, inner chunk = one image, and a
done marker per shard (``shard_done``: one tiny object holding the shard's CRC-32C checksums). A
writer owns whole shards, so processes writing disjoint shards never touch the same object.
Chunk keys use the "." separator (``features/c.12.0.0.0``), so one listing of an array's folder
shows which shards exist. Uncompressed arrays on a local disk are read and written directly
(chx/store/_shardfile.py; the same bytes zarr writes), everything else through zarr.

Format 1 (older stores, still read and written): one chunk per image of ``features``,
``features_flip`` and ``done`` (keys ``done/c/<row>``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from chx.errors import ChxError
from chx.store import _remote, _shardfile
from chx.store._base import FeatureStore
from chx.store._common import HINT_RECREATE, META_ARRAYS, contiguous_runs, is_provably_ours, local_path
from chx.store._layout import StoreSpec
from chx.store._zarr_make import populate as _populate   # one name: tests patch _zarr._populate

MAP_ARRAYS = ("features", "features_flip", "scale")
# Every entry chx puts at a store's top level; anything else there is the user's.
OWNED_ENTRIES = frozenset(("zarr.json", "done", "shard_done", *MAP_ARRAYS, *META_ARRAYS))


def _make_store(path: str, read_only: bool):
    from zarr.storage import FsspecStore, LocalStore

    local = local_path(path)
    if local is not None:
        return LocalStore(local, read_only=read_only)
    try:
        store = FsspecStore.from_url(str(path), read_only=read_only, storage_options=_remote.storage_options(path))
    except ImportError as e:
        raise _remote.missing_package(path, e) from None
    except ValueError as e:
        raise ChxError(f"feature store {path}: cannot open this URL ({e}); check the path") from None
    _remote.bound(store.fs)
    return store


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


def _sync(coro):
    from zarr.core.sync import sync  # zarr's own bridge to its async store API

    return sync(coro)


def _is_temp(name: str) -> bool:
    return name.endswith(".partial")   # a writer's leftover temp file (zarr's and _shardfile's pattern)


class ZarrFeatureStore(FeatureStore):
    backend = "zarr"
    supports_parallel_writers = True

    # ----------------------------------------------------------------------------------- contract
    @classmethod
    def probe(cls, path: str) -> tuple[str, str]:
        local = local_path(path)
        if local is not None:
            if not local.exists() or (local.is_dir() and not any(local.iterdir())):
                return "absent", ""
            if not local.is_dir():
                return "foreign", "it is a file, not a folder"
        else:
            _remote.check(path)          # missing bucket, refused credentials, no endpoint: one line
            if not _remote_exists(path):
                return "absent", ""
        attrs = _root_attrs(path)
        if attrs is None:
            return "foreign", "no readable zarr.json with chx's format attributes"
        if not is_provably_ours(attrs):
            return "foreign", "its zarr.json lacks chx's format attributes"
        if local is None and "format_version" not in attrs:
            # Object storage has no rename: another writer is creating it now (or one was interrupted
            # doing so). create_store then creates it too, idempotently (see _populate).
            return "creating", "its creation has not finished (format_version not written yet)"
        alien = _alien_entries(path)
        if alien:
            more = ", ..." if len(alien) > 3 else ""
            return "foreign", f"it holds entries chx did not make: {', '.join(alien[:3])}{more}"
        try:
            cls(path, "r", refresh_meta=True).close()   # views/splits/labels: a rerun rewrites them
            return "store", ""
        except ChxError as e:
            return "damaged", str(e)

    @classmethod
    def create(cls, path: str, spec: StoreSpec, replace: bool) -> bool:
        local = local_path(path)
        if local is None:
            # Object storage has no rename and no lock: the attributes (format_version among them) are
            # written last, and a new store is populated idempotently, so several writers starting at
            # once may all create it (identical objects; an existing array is checked, never replaced).
            _populate(_make_store(path, read_only=False), spec, fresh=replace)
            return True
        # Local: build beside the target under a temp name, then rename it into place.
        local.parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:12]
        tmp = local.parent / f".{local.name}.tmp-{tag}"
        try:
            from zarr.storage import LocalStore

            _populate(LocalStore(tmp), spec)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if replace and local.exists() and any(local.iterdir()):
            old = local.parent / f".{local.name}.old-{tag}"
            lock = _dir_lock(local, exclusive=True)   # writers hold it shared: never replace a store being written
            if lock is None:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ChxError(f"feature store {path} is being written by another process (an extraction); "
                               f"--overwrite never replaces a store in use: wait for that process to finish (or "
                               f"stop it), then rerun")
            try:
                os.rename(local, old)
                os.rename(tmp, local)
            finally:
                if lock >= 0:
                    os.close(lock)
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

    # ----------------------------------------------------------------------------------- primitives
    def _open(self, mode: str) -> None:
        local = local_path(self.path)
        if local is not None and not local.exists():
            raise ChxError(f"no feature store at {self.path}; check the path or create it with "
                           f"`chx extract-features`")
        if local is not None and not local.is_dir():
            raise ChxError(f"{self.path} is a file, not a Zarr feature store (a directory); for an HDF5 store "
                           f"name the file *.h5")
        if local is None:
            _remote.check(self.path)     # missing bucket, refused credentials, no endpoint: one line
        self._local = local
        self._lock = None
        if local is not None and mode != "r":   # the writers' lock, shared: --overwrite needs it exclusively
            self._lock = _dir_lock(local, exclusive=False)
            if self._lock is None:
                raise ChxError(f"feature store {self.path} is being replaced by another process (--overwrite); "
                               f"wait for it to finish, then rerun")
        self._zstore = _make_store(self.path, read_only=(mode == "r"))
        self._group = _open_group(self._zstore, self.path, "r" if mode == "r" else "r+")
        self._arrays: dict = {}

    def _read_attrs(self) -> dict:
        import zarr

        try:   # the format given: zarr then reads one object (not 8 probes and listings on object storage)
            return zarr.open_group(store=self._zstore, mode="r",
                                   zarr_format=self._group.metadata.zarr_format).attrs.asdict()
        except Exception as e:
            raise ChxError(f"feature store {self.path}: cannot read its attributes ({e}); {HINT_RECREATE}") from None

    def _set_attrs(self, attrs: dict) -> None:
        # One metadata write, merged into the attributes as stored now (not zarr's attrs.update,
        # which writes once per key from this handle's cached copy: other writers' changes lost,
        # and half-updated attributes visible in between).
        import zarr

        self._group = zarr.open_group(store=self._zstore, mode="r+").update_attributes(attrs)

    def _open_arrays(self, names: list[str]) -> None:
        for name in names:
            try:
                # write_empty_chunks: an all-zero map is still stored, so a missing object always means lost data
                self._arrays[name] = self._group[name].with_config({"write_empty_chunks": True})
            except Exception as e:  # KeyError, or broken array metadata
                raise ChxError(f"feature store {self.path} is damaged: array {name!r} cannot be opened "
                               f"({type(e).__name__}: {e}); {HINT_RECREATE}") from None
        plain = {n for n in names if n in MAP_ARRAYS and self.is_sharded and not self._arrays[n].compressors}
        self._direct_names = plain if self._local is not None else set()
        self._put_names = plain if self._local is None else set()   # object storage: a shard in one PUT

    @property
    def _get_names(self) -> set:
        """Object storage: arrays whose rows are read in one ranged GET (no index read), where every
        row has its bound checksum to check them by (integrity >= 1)."""
        return self._put_names if self._integrity else set()

    def _array_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)

    def _array_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._arrays[name].dtype)

    def _read_array(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name][...]
        except Exception as e:
            raise ChxError(f"feature store {self.path}: cannot read {name!r} ({type(e).__name__}: {e}); "
                           f"{HINT_RECREATE}") from None

    def _replace_array(self, name: str, values: np.ndarray) -> None:
        self._arrays[name][...] = values

    @property
    def compressed(self) -> bool:
        return bool(self._arrays["features"].compressors)

    def _key(self, name: str, row: int) -> str:
        """The object key holding `row` of `name` (its shard's key in format 2)."""
        arr = self._arrays[name]
        chunk = (int(row) // int(arr.metadata.chunk_grid.chunk_shape[0]),) + (0,) * (arr.ndim - 1)
        return f"{name}/{arr.metadata.encode_chunk_key(chunk)}"

    def _object_path(self, key: str) -> str:
        """The path of a key in the fsspec filesystem of a remote store."""
        return f"{self._zstore.path.rstrip('/')}/{key}"

    def _read_raw(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self._direct_names and name not in self._get_names:
            return self._arrays[name][start:stop]
        arr, s_img = self._arrays[name], self.shard_images
        parts = []
        for s in range(start // s_img, (stop - 1) // s_img + 1):
            lo, hi = max(start, s * s_img) - s * s_img, min(stop, (s + 1) * s_img) - s * s_img
            try:
                if name in self._get_names:
                    parts.append(_sync(_shardfile.get_rows(self._zstore.fs, self._object_path(self._key(name, s * s_img)),
                                                           lo, hi, tuple(arr.shape[1:]), arr.dtype)))
                    continue
                parts.append(_shardfile.read_rows(self._local / self._key(name, s * s_img), lo, hi, s_img,
                                                  tuple(arr.shape[1:]), arr.dtype))
            except _shardfile.ShardFileError as e:
                e.row = s * s_img + (lo if e.row is None else e.row)
                raise
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _fill_if_missing(self, name: str) -> bool:
        return name not in self._direct_names and name not in self._get_names

    def _object_missing(self, name: str, row: int) -> bool:
        return not _sync(self._zstore.exists(self._key(name, row)))

    def _chunk_ids(self, name: str) -> np.ndarray | None:
        """First chunk coordinates of the objects `name` holds, from one listing (None if unlistable)."""
        nested = self._arrays[name].metadata.chunk_key_encoding.separator == "/"
        try:
            if self._local is not None:
                folder = self._local / name / ("c" if nested else "")
                try:
                    names = [e.name for e in os.scandir(folder)]
                except FileNotFoundError:
                    names = []
            else:
                async def keys():
                    return [k async for k in self._zstore.list_prefix(f"{name}/c/" if nested else f"{name}/")]

                names = [k.split("/", 1)[1] for k in _sync(keys())]
                if nested:
                    names = [k.split("/")[1] for k in names]
        except Exception:
            return None
        if nested:   # format 1: one folder (or file) per first coordinate under c/
            idx = [int(x) for x in names if x.isdigit()]
        else:
            ndim = self._arrays[name].ndim
            parts = [x.split(".") for x in names if x.startswith("c.") and not _is_temp(x)]
            idx = [int(p[1]) for p in parts if len(p) == ndim + 1 and all(q.isdigit() for q in p[1:])]
        return np.asarray(idx, dtype=np.int64)

    def _missing_objects(self) -> dict[str, np.ndarray]:
        if not self.is_sharded:
            return {}
        out = {}
        for name in (n for n in MAP_ARRAYS if n in self._arrays):
            have = self._chunk_ids(name)
            if have is not None:
                present = np.zeros(self.n_shards, dtype=bool)
                present[have[have < self.n_shards]] = True
                if not present.all():
                    out[name] = np.flatnonzero(~present)
        return out

    def _write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        arr = self._arrays[name]
        runs = contiguous_runs(rows)
        if len(runs) == 1:
            arr[runs[0][0]:runs[0][1]] = values
        else:  # one call, so zarr writes the (separate) chunks concurrently
            arr.oindex[(rows,) + (slice(None),) * (values.ndim - 1)] = values

    def _write_shard_raw(self, name: str, shard: int, values: np.ndarray) -> None:
        a, b = self.shard_rows(shard)
        if name in self._direct_names:
            _shardfile.write_shard(self._local / self._key(name, a), values, self.shard_images)
            return
        if name in self._put_names:     # one PUT replaces the object whole
            _sync(_shardfile.put_shard(self._zstore.fs, self._object_path(self._key(name, a)), values,
                                       self.shard_images))
            return
        # Through zarr: delete the old object first, so zarr has nothing to read back and merge.
        _sync(self._zstore.delete(self._key(name, a)))
        self._arrays[name][a:b] = values

    def _done_units(self) -> np.ndarray:
        name = self._done_array
        n = self._arrays[name].shape[0]
        listed = self._chunk_ids(name)   # done chunks only ever hold non-fill values: existence = done
        if listed is None:
            values = np.asarray(self._arrays[name][...])
            return (values[:, 0] if values.ndim == 2 else values) != 0
        out = np.zeros(n, dtype=bool)
        out[listed[listed < n]] = True
        if self.is_sharded and self._local is None:
            # Object storage: the shards listed without a done record. Writing one of them needs no DELETE
            # first (a writer owns whole shards: nobody else puts that record meanwhile); one listed done is
            # cleared before it is rewritten, as always.
            self._absent_done = set(np.flatnonzero(~out).tolist())
        return out

    def _set_done(self, units: np.ndarray, records: np.ndarray | None = None) -> None:
        if self.is_sharded:
            for s, rec in zip(units, records):
                self._arrays["shard_done"][int(s)] = rec
                self.__dict__.get("_absent_done", set()).discard(int(s))
            return
        arr = self._arrays["done"]
        runs = contiguous_runs(units)
        if len(runs) == 1:
            arr[runs[0][0]:runs[0][1]] = 1
        else:
            arr.oindex[units] = np.ones(len(units), dtype=np.uint8)

    def _clear_done(self, units: np.ndarray) -> None:
        name = self._done_array
        for u in units:
            if self._local is None:     # one DELETE (zarr's delete lists the key first); absent: nothing to do
                if int(u) in self.__dict__.get("_absent_done", ()):
                    continue            # this handle read no record for it (see _shard_records): no request
                try:
                    _sync(self._zstore.fs._rm_file(self._object_path(self._key(name, int(u)))))
                except FileNotFoundError:
                    pass
                continue
            _sync(self._zstore.delete(self._key(name, int(u))))

    def _shard_records(self, start: int, stop: int) -> np.ndarray:
        arr = self._arrays["shard_done"]
        if self._local is not None or [type(c).__name__ for c in arr.metadata.codecs] != ["BytesCodec"]:
            return np.asarray(arr[start:stop], dtype=np.uint32).reshape(-1, arr.shape[1])
        paths = [self._object_path(self._key("shard_done", s)) for s in range(start, stop)]
        return _sync(_shardfile.get_records(self._zstore.fs, paths, int(arr.shape[1])))   # a GET each, no HEAD

    def _disk_usage(self):
        if self._local is None:
            return None, None, None
        return _du(self._local)

    def feature_bytes_on_disk(self) -> int | None:
        if self._local is None:
            return None
        return sum(_du(self._local / n)[1] for n in MAP_ARRAYS if n in self._arrays)

    def close(self) -> None:
        try:
            self._zstore.close()
        except Exception:
            pass
        if getattr(self, "_lock", None) is not None:
            if self._lock >= 0:
                os.close(self._lock)
            self._lock = None


def _dir_lock(folder: Path, exclusive: bool) -> int | None:
    """flock on the store folder itself (no lock file to leave behind): shared for writers (several
    --shard processes write one store), exclusive for --overwrite. The open descriptor, or None when
    another process holds a conflicting lock; -1 where the folder cannot be opened to lock it."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise


def _du(folder: Path) -> tuple[int, int, int]:
    """(bytes on disk as `du` counts them: st_blocks * 512 of every file and folder, logical bytes of
    the files: st_size, number of files) under folder."""
    blocks = size = files = 0
    for root, _dirs, names in os.walk(folder):
        try:
            blocks += os.stat(root).st_blocks * 512      # folders take blocks too (format 1: 3 per image)
        except OSError:
            pass
        for f in names:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            blocks, size, files = blocks + st.st_blocks * 512, size + st.st_size, files + 1
    return blocks, size, files


# ------------------------------------------------------------------------------------ probing helpers
def _remote_exists(path: str) -> bool:
    try:
        fs, root = _remote.filesystem(path)
        return fs.exists(root) and not (fs.isdir(root) and not fs.ls(root))
    except Exception:
        return True   # cannot tell: treat as present, so nothing is replaced unseen


def _root_attrs(path: str) -> dict | None:
    """The root zarr.json's attributes, or None when it is missing or unreadable."""
    try:
        local = local_path(path)
        if local is not None:
            text = (local / "zarr.json").read_text()
        else:
            fs, root = _remote.filesystem(path)
            text = fs.cat_file(root.rstrip("/") + "/zarr.json").decode()
        attrs = json.loads(text).get("attributes", {})
        return attrs if isinstance(attrs, dict) else None
    except Exception:
        return None


def _alien_entries(path: str) -> list[str]:
    """Entries of a store folder that chx did not make (top level, and inside its array folders)."""
    local = local_path(path)
    try:
        if local is not None:
            top = {e.name: e.is_dir() for e in os.scandir(local)}
            inner = {n: [e.name for e in os.scandir(local / n)] for n, is_dir in top.items()
                     if is_dir and n in OWNED_ENTRIES}
        else:
            fs, root = _remote.filesystem(path)
            listing = fs.ls(root, detail=True)
            top = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] == "directory" for e in listing}
            inner = {n: [x.rstrip("/").rsplit("/", 1)[-1] for x in fs.ls(root.rstrip("/") + "/" + n, detail=False)]
                     for n, is_dir in top.items() if is_dir and n in OWNED_ENTRIES}
    except Exception:   # cannot list: nothing is known to be the user's (the attributes proved the store)
        return []
    alien = [n for n in top if n not in OWNED_ENTRIES and not _is_temp(n)]
    for folder, names in inner.items():
        alien += [f"{folder}/{x}" for x in names if not (x == "zarr.json" or x == "c" or x.startswith("c.")
                                                          or _is_temp(x))]
    return sorted(alien)

