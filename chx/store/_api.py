"""create_store / open_store: pick the backend from the path and guard against mixing stores."""

from __future__ import annotations

import os
from typing import Sequence

from chx.errors import ChxError
from chx.store import _codec
from chx.store._base import FeatureStore
from chx.store._common import local_path
from chx.store._layout import (FORMAT_VERSION, LEGACY_SHARD_IMAGES, StoreSpec, build_layout, check_feature_shape,
                               normalise_fingerprint)


def is_hdf5_path(path) -> bool:
    return str(path).lower().endswith((".h5", ".hdf5"))


def backend_class(path) -> type[FeatureStore]:
    """The backend that handles `path`: HDF5 for *.h5/*.hdf5, else Zarr."""
    if is_hdf5_path(path):
        from chx.store._hdf5 import HDF5FeatureStore
        return HDF5FeatureStore
    from chx.store._zarr import ZarrFeatureStore
    return ZarrFeatureStore


def open_store(path, mode: str = "r", *, require_complete: bool = False) -> FeatureStore:
    """Open an existing store: mode "r" (read-only, the default) or "r+" (write features, mark complete).

    A Zarr directory (local path or fsspec URL) or an HDF5 file (path ending .h5/.hdf5). A missing or
    damaged store raises ChxError naming the path and what to do. require_complete=True (what every
    reader should ask for) also refuses, with one line, a store that is not complete or whose shard
    objects are not all there (see :meth:`FeatureStore.require_complete`)."""
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
    path = os.fspath(path) if not isinstance(path, str) else path
    store = backend_class(path)(path, mode)
    if require_complete:
        try:
            store.require_complete()
        except BaseException:
            store.close()
            raise
    return store


def create_store(path, *, image_ids: Sequence[str], study_ids: Sequence[str], views: Sequence[str],
                 splits: Sequence[str], labels, class_names: Sequence[str], feature_shape: Sequence[int],
                 fingerprint: dict, flip: bool = False, overwrite: bool = False, compress: bool = False,
                 dtype: str = "float16", shard_images: int | None = None,
                 format_version: int | None = None) -> FeatureStore:
    """Create a store for these images (per-image inputs in any order), or reopen a matching one.

    Images are stored sorted by study (first appearance of each study, then input order), so each
    study is one contiguous slice; `store.image_index(ids)` maps ids to store rows. When `path`
    already holds a store made with the same fingerprint, class names, dtype and images (same study
    for each image), it is reopened for writing with its done markers kept (resume); its views,
    splits and labels are refreshed from these inputs if they changed (listed in
    `store.updated_metadata`). Any other difference raises ChxError naming it; overwrite=True
    replaces the store instead - but only a store that is provably chx's (its format attributes, or
    an HDF5 file's chx header): anything else at `path` is refused, never deleted.

    dtype: how maps are stored - "float16", "bfloat16" or "float8" (e4m3 with a per-image,
    per-channel scale; half the bytes); reads always return float16 (see chx/store/_codec.py for the
    float8 error bound). shard_images: images per shard (format 2; default
    :func:`chx.store._codec.default_shard_images` of the map size). format_version: 2 (the
    default: sharded) or 1 (one object per image, float16 only; for tests of older stores).

    compress=True compresses the feature maps (Zarr: zstd; HDF5: lzf + byte shuffle); off by
    default, because float16 maps barely compress (measured 1.00-1.09x) while compression costs
    write and read time (see benchmarks/bench_store_write.py). A reopened store keeps its codec.

    Creation is atomic on local paths (built under a temp name beside the target, then renamed);
    on object storage the attributes, `format_version` among them, are written last, and a store
    without them is refused by open_store as half-initialised. There, several writers (machines,
    array tasks) may start at once without a lock: creation is idempotent (each writes the same
    objects where absent, never deleting any) and every writer then checks the store against its
    inputs like a resume, so an identical layout is accepted and a different one refused."""
    path = os.fspath(path) if not isinstance(path, str) else path
    cls = backend_class(path)
    spec = _spec(image_ids, study_ids, views, splits, labels, class_names, feature_shape, fingerprint, flip,
                 compress, dtype, shard_images, format_version)

    state, reason = cls.probe(path)
    if state == "foreign":
        raise ChxError(f"{path} exists and is not a chx feature store ({reason}); refusing to replace it, even "
                       f"with --overwrite: choose another store path (or delete it yourself if it is yours)")
    if state == "busy":
        raise ChxError(f"feature store {path} is open in another process ({reason}): wait for that process to "
                       f"finish (or stop it), then rerun")
    if state == "damaged" and not overwrite:
        raise ChxError(f"{path} exists but is not a usable feature store ({reason}); use --overwrite to replace it")
    if state == "store" and not overwrite:
        return _reopen(path, spec)
    if state == "creating":   # object storage: another writer is creating it (or was interrupted): join it
        try:
            cls.create(path, spec, replace=False)
        except ChxError:
            if not overwrite:
                raise
            cls.create(path, spec, replace=True)
        return _reopen_shared(cls, path, spec)
    try:
        created = cls.create(path, spec, replace=(state != "absent"))
    except OSError as e:   # an unwritable or missing folder, a full disk: the user's to fix
        raise ChxError(f"could not create feature store {path}: {e.strerror or e}; choose another store path, "
                       f"or fix the folder (permissions, free space)") from None
    if not created:   # another process created it meanwhile: same checks as a resume
        return _reopen(path, spec)
    if local_path(path) is None:
        # Object storage, where several writers may have created it at once: the same checks as a
        # resume (an identical layout is accepted, anything else refused).
        return _reopen_shared(cls, path, spec)
    return open_store(path, "r+")


def _spec(image_ids, study_ids, views, splits, labels, class_names, feature_shape, fingerprint, flip, compress,
          dtype, shard_images, format_version) -> StoreSpec:
    layout = build_layout(image_ids, study_ids, views, splits, labels, class_names)
    shape = check_feature_shape(feature_shape)
    classes = [str(c) for c in class_names]
    if len(set(classes)) != len(classes):
        raise ChxError(f"class names repeat: {sorted({c for c in classes if classes.count(c) > 1})}")
    dtype = _codec.check_dtype(dtype)
    version = FORMAT_VERSION if format_version is None else int(format_version)
    if version not in (1, 2):
        raise ValueError(f"format_version must be 1 or 2, not {format_version!r}")
    if version == 1 and dtype != "float16":
        raise ValueError(f"format 1 stores hold float16 only, not {dtype}")
    if shard_images is not None and (version == 1 or int(shard_images) < 1):
        raise ValueError(f"shard_images={shard_images!r}: needs format 2 and a positive count")
    s = LEGACY_SHARD_IMAGES if version == 1 else \
        min(int(shard_images), layout.n_images) if shard_images is not None else \
        _codec.default_shard_images(layout.n_images, shape, dtype, bool(flip))
    pinned = tuple(k for k, v in (("format_version", format_version), ("shard_images", shard_images)) if v is not None)
    return StoreSpec(layout=layout, class_names=classes, feature_shape=shape,
                     fingerprint=normalise_fingerprint(fingerprint), flip=bool(flip), dtype=dtype,
                     compress=bool(compress), format_version=version, shard_images=s, pinned=pinned)


def _reopen_shared(cls, path, spec: StoreSpec) -> FeatureStore:
    """_reopen after an idempotent creation on object storage. A writer that started creating at
    the same time can still overwrite the finished root group with its first, marker-only version
    (a check-then-write gap of one request): then the creation is simply written again, once."""
    try:
        return _reopen(path, spec)
    except ChxError:
        if cls.probe(path)[0] != "creating":
            raise
    cls.create(path, spec, replace=False)
    return _reopen(path, spec)


def _reopen(path, spec: StoreSpec) -> FeatureStore:
    store = backend_class(path)(path, "r+", refresh_meta=True)   # damaged views/splits/labels: rewritten
    try:
        return store._reopen(spec)
    except BaseException:
        store.close()
        raise
