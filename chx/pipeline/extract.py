"""Stage 2a: `chx extract-features`, the frozen stage-1 backbone's feature maps -> feature store.

The store is written in whole shards (many consecutive images of a few studies, one object per
array; :mod:`chx.store`): a writer buffers a shard's maps in memory and writes it once, then marks
it done. Resumable (a rerun computes only the shards not done: at most the ones in flight when a
run stopped) and parallel: ``--shard i/n`` or torchrun ranks own disjoint shards of one Zarr store.
Images are decoded in DataLoader workers while the model runs, and store writes happen in a
background thread, so decoding and writing hide behind the forward pass. The store is marked
complete only when every shard is done. ``--repair`` re-extracts the shards that
``chx store verify`` finds damaged (missing objects, checksum mismatches).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from chx.data.datasets import ImageDataset, label_matrix
from chx.data.image_cache import open_image_cache
from chx.data.manifest import class_columns, read_manifest
from chx.data.transforms import Preprocess
from chx.engine.compat import leakage_warning, require_same_classes
from chx.engine.distributed import resolve_device
from chx.engine.inference import autocast_dtype, feature_maps, load_backbone, model_to, precision_name
from chx.engine.store_writer import (check_writers, creation_lock, fill_shards, mark_if_complete,
                                     parse_shard, repair_shards, write_errors, writer_todo)
from chx.models import eval_weights, weights_hash
from chx.options import ExtractOptions
from chx.store import create_store, projected_size
from chx.workers import worker_init

__all__ = ["extract_features", "ExtractResult", "parse_shard"]   # parse_shard: chx.engine.store_writer's


@dataclass
class ExtractResult:
    store: str
    written: int
    remaining: int
    complete: bool
    images_per_s: float


def extract_features(checkpoint: Path, manifest: Path, images: Path, store_path: str, *, echo=print,
                     images_cache: str | None = None, **options) -> ExtractResult:
    """Fill ``store_path`` with the feature maps of the manifest's images; ``options`` are the
    fields of :class:`chx.options.ExtractOptions` (pool, flip, batch_size, workers, device, shard,
    compress, overwrite); ``images_cache``: an image cache (`chx cache-images`) to read the images
    from instead of their files (the same maps, exactly)."""
    opts = ExtractOptions(**options)
    opts.validate()
    pool, flip, batch_size, workers = opts.pool, opts.flip, opts.batch_size, opts.workers
    device, overwrite, compress = opts.device, opts.overwrite, opts.compress
    shard_i, shard_n = parse_shard(opts.shard)
    check_writers(store_path, shard_n, opts.repair)
    dev = resolve_device(device)      # under torchrun: this rank's GPU
    model, ckpt = load_backbone(checkpoint)
    df = read_manifest(manifest, soft=True)
    leak = leakage_warning(ckpt, df, manifest, checkpoint)
    if leak:
        echo(leak)
    classes = class_columns(df)
    require_same_classes(classes, ckpt["class_names"], str(manifest), str(checkpoint))
    pre = Preprocess.from_dict(ckpt["preprocess"])
    # Check the inputs before a store exists: a wrong --images must not leave an empty store behind.
    cache = open_image_cache(images_cache, pre)
    ImageDataset(df, images, pre, train=False, classes=classes, cache=cache).require_files()
    model_to(model, dev)

    amp = autocast_dtype(opts.precision, dev)          # --precision (GPU only)
    probe = feature_maps(model, torch.zeros(1, 1, pre.size, pre.size, device=dev), pool, amp=amp)
    feature_shape = tuple(int(s) for s in probe.shape[1:])
    fingerprint = {
        "checkpoint_sha256": weights_hash(eval_weights(ckpt)),
        "model": ckpt["model_config"].get("backbone_name", ckpt["model_config"].get("name")),
        "input_size": pre.size, "resize": pre.mode, "layer": "last-stage",
        "pool": pool, "flip": flip, "dtype": opts.dtype,
    }
    if amp is not None:      # absent for float32, as in stores made before --precision
        fingerprint["precision"] = precision_name(amp)
    size = projected_size(df.height, feature_shape, flip, opts.dtype)
    echo(f"store {store_path}: {df.height:,} images x {feature_shape} {opts.dtype}"
         f"{' (+ flipped)' if flip else ''} = {size / 2**20:,.1f} MiB projected on disk before compression")

    with write_errors(store_path), creation_lock(str(store_path)):
        store = create_store(
            store_path, image_ids=df["image_id"].to_list(), study_ids=df["study_id"].to_list(),
            views=df["view"].to_list(), splits=df["split"].fill_null("").to_list(),
            labels=label_matrix(df, classes), class_names=classes, feature_shape=feature_shape,
            fingerprint=fingerprint, flip=flip, overwrite=overwrite and shard_i == 0, compress=compress,
            dtype=opts.dtype, shard_images=opts.shard_images)
    if store.updated_metadata:
        echo(f"note: the manifest changed the store's {', '.join(store.updated_metadata)} (refreshed; the "
             f"maps were kept)")
    if opts.repair:
        repair_shards(store, echo)

    # This writer's shards that are not done yet, and their rows in store order.
    mine, todo_rows, todo_df = writer_todo(store, df, shard_i, shard_n)

    def maps_of(batch):
        x = batch["image"].to(dev, non_blocking=True)
        feats = feature_maps(model, x, pool, amp=amp).cpu().numpy()
        return feats, feature_maps(model, x, pool, flip=True, amp=amp).cpu().numpy() if flip else None

    written, elapsed = 0, 0.0
    if len(todo_rows):
        dataset = ImageDataset(todo_df, images, pre, train=False, classes=classes, cache=cache)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=dev.type == "cuda", worker_init_fn=worker_init)
        with write_errors(store_path):
            written, elapsed = fill_shards(store, mine, todo_rows, loader, maps_of,
                                           desc=f"extract{f' {shard_i}/{shard_n}' if shard_n > 1 else ''}")
    store.close()

    with write_errors(store_path):
        remaining = mark_if_complete(store_path)
    return ExtractResult(str(store_path), written, remaining, remaining == 0,
                         written / elapsed if elapsed else 0.0)
