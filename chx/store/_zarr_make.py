"""Creating a Zarr store's arrays and attributes (:func:`populate`): fresh, or on object storage
idempotently beside other writers. The backend class is in chx/store/_zarr.py."""

from __future__ import annotations

import numpy as np

from chx.errors import ChxError
from chx.store import _codec
from chx.store._layout import MARKER, StoreSpec

META_CHUNK = 65536                     # elements per chunk of the small per-image/per-study arrays
KEY_V1 = {"name": "default", "separator": "/"}   # format 1: chunk i of `done` is the key done/c/i
KEY_V2 = {"name": "default", "separator": "."}   # format 2: shard s of `features` is features/c.s.0.0.0


def populate(store, spec: StoreSpec, fresh: bool = True) -> None:
    """Write a new store's arrays, then its attributes in one final metadata write (format_version
    with them), so an interrupted creation never looks like a valid store; the marker attribute
    goes first, so it is still provably chx's (and --overwrite may replace it).

    fresh=False (object storage, nothing to replace): idempotent and never destructive, for several
    writers that start at once without a lock: the group and each array are created only where
    absent (an existing one must have the same shape and chunks, else ChxError), the small metadata
    arrays are written whole (every writer of the same spec writes the same bytes; whole-object
    writes are atomic on object storage) and the attributes are merged in last. Shard data and
    done markers another writer has written meanwhile are never touched."""
    import zarr

    lay, (c, h, w) = spec.layout, spec.feature_shape
    n, s, k = lay.n_images, len(lay.study_ids), len(spec.class_names)
    v2 = spec.format_version >= 2
    enc = KEY_V2 if v2 else KEY_V1
    g = zarr.open_group(store=store, mode="w", attributes={MARKER: True}) if fresh else shared_group(store)

    def array(name, **kw):
        if fresh:
            return g.create_array(name, **kw)
        from zarr.errors import ContainsArrayAndGroupError, ContainsArrayError, ContainsGroupError

        try:
            return g.create_array(name, **kw)
        except (ContainsArrayError, ContainsGroupError, ContainsArrayAndGroupError):
            pass
        try:
            a = g[name]
            same = tuple(a.shape) == tuple(kw["shape"]) and tuple(a.chunks) == tuple(kw["chunks"])
        except Exception:   # noqa: BLE001 - a group or broken metadata where the array belongs
            same = False
        if not same:
            raise ChxError(f"feature store {store.path}: another writer is creating it with a different layout "
                           f"(array {name!r}); run every writer with the same manifest, checkpoint and options, "
                           f"or use --overwrite (with one writer) to replace it")
        return a

    mc = lambda m: (max(1, min(m, META_CHUNK)),)  # noqa: E731
    stored = _codec.STORED_NUMPY[spec.dtype]
    for name in spec.feature_arrays:
        array(name, shape=(n, c, h, w), dtype=stored, chunks=(1, c, h, w),
              shards=(spec.shard_images, c, h, w) if v2 else None, fill_value=0, chunk_key_encoding=enc,
              compressors="auto" if spec.compress else None)   # "auto": zarr's default, zstd
    if v2:
        if _codec.has_scale(spec.dtype):
            nf = len(spec.feature_arrays)
            array("scale", shape=(n, nf, c), dtype="float32", chunks=(1, nf, c),
                  shards=(spec.shard_images, nf, c), fill_value=0, chunk_key_encoding=enc, compressors=None)
        width = spec.done_record_width     # flag, shard checksums (+ per-row checksums: integrity >= 1)
        array("shard_done", shape=(spec.n_shards, width), dtype="uint32",
              chunks=(1, width), fill_value=0, chunk_key_encoding=enc, compressors=None)
    else:
        array("done", shape=(n,), dtype="uint8", chunks=(1,), fill_value=0, chunk_key_encoding=enc,
              compressors=None)
    for name, values, count in (("image_id", lay.image_ids, n), ("view", lay.views, n),
                                ("split", lay.splits, n), ("study_id", lay.study_ids, s)):
        a = array(name, shape=(count,), dtype=str, chunks=mc(count), chunk_key_encoding=enc)
        a[...] = np.asarray(values, dtype=object)
    a = array("study_ptr", shape=(s + 1,), dtype="int64", chunks=(s + 1,), chunk_key_encoding=enc)
    a[...] = lay.study_ptr
    a = array("labels", shape=(s, k), dtype="float32", chunks=(mc(s)[0], max(k, 1)),
              fill_value=float("nan"), chunk_key_encoding=enc)
    a[...] = lay.labels
    if fresh:
        g.update_attributes(spec.attrs())       # one write, the last one
    else:                                       # merged into what is stored now, in one write
        zarr.open_group(store=store, mode="r+").update_attributes(spec.attrs())


def shared_group(store):
    """The root group, created with the marker attribute only where it does not exist yet (never
    replaced: another writer may have finished creating the store meanwhile)."""
    import zarr
    from zarr.errors import ContainsArrayAndGroupError, ContainsArrayError, ContainsGroupError

    try:
        return zarr.open_group(store=store, mode="r+")
    except FileNotFoundError:
        pass
    try:
        return zarr.create_group(store=store, attributes={MARKER: True})
    except (ContainsGroupError, ContainsArrayError, ContainsArrayAndGroupError):
        return zarr.open_group(store=store, mode="r+")
