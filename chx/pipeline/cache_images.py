"""`chx cache-images`: decode every image of a manifest once, at the model's preprocessing size,
into an image cache (:mod:`chx.data.image_cache`) that every image reader takes with
``--images-cache`` instead of the original files.

The cache is a feature store of uint8 images [1, S, S] written the way extract-features writes its
maps (:mod:`chx.engine.store_writer`): whole shards, checksums, done marks; resumable (a rerun
decodes only the shards not done), parallel (``--shard i/n``, ``--shard auto``, torchrun ranks on
one Zarr cache), ``--repair`` after ``chx store verify``; complete once every shard is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from chx.data.datasets import ImageDataset
from chx.data.image_cache import DTYPE, ImageSteps, cache_fingerprint
from chx.data.manifest import read_manifest
from chx.data.transforms import Preprocess
from chx.engine.store_writer import (check_writers, creation_lock, fill_shards, mark_if_complete, parse_shard,
                                     repair_shards, write_errors, writer_todo)
from chx.errors import ChxError
from chx.models import load_checkpoint
from chx.options import CacheImagesOptions
from chx.store import create_store, projected_size
from chx.workers import worker_init


@dataclass
class CacheResult:
    cache: str
    preprocess: Preprocess
    written: int
    remaining: int
    complete: bool
    images_per_s: float


def cache_preprocess(size: int | None, resize: str | None, checkpoint: Path | None) -> Preprocess:
    """The size and resize mode to cache at: --size/--resize, or the --checkpoint's (which they must match)."""
    if checkpoint is None:
        if size is None:
            raise ChxError("give --size (the model's input size) or --checkpoint (to take its preprocessing)")
        return Preprocess(size=size, mode=resize or "letterbox")
    pre = load_checkpoint(checkpoint).get("preprocess")
    if not pre:
        raise ChxError(f"--checkpoint {checkpoint} reads no images (no preprocessing); give a backbone or joint "
                       f"checkpoint, or --size and --resize")
    pre = Preprocess.from_dict(pre)
    if (size is not None and size != pre.size) or (resize is not None and resize != pre.mode):
        raise ChxError(f"--checkpoint {checkpoint} preprocesses to {pre.size} px {pre.mode}, not --size "
                       f"{size or pre.size} --resize {resize or pre.mode}; drop --size/--resize or the checkpoint")
    return pre


def cache_images(o: CacheImagesOptions, images: Path | None, *, echo=print) -> CacheResult:
    """Fill the image cache ``o.out`` with the images of ``o.manifest`` under ``images``."""
    pre = cache_preprocess(o.size, o.resize, o.checkpoint)
    out = str(o.out)
    shard_i, shard_n = parse_shard(o.shard)
    check_writers(out, shard_n, o.repair, work="caching")
    df = read_manifest(o.manifest, soft=True, require_labels=False)
    # Check the inputs before a cache exists: a wrong --images must not leave an empty cache behind.
    ImageDataset(df, images, pre, classes=[]).require_files()
    shape = (1, pre.size, pre.size)
    echo(f"image cache {out}: {df.height:,} images x {pre.size} px {pre.mode} {DTYPE} = "
         f"{projected_size(df.height, shape, False, DTYPE) / 2**20:,.1f} MiB before compression")

    with write_errors(out, "image cache", "the images cached so far"), creation_lock(out):
        store = create_store(
            out, image_ids=df["image_id"].to_list(), study_ids=df["study_id"].to_list(),
            views=df["view"].to_list(), splits=[""] * df.height, labels=np.zeros((df.height, 0), np.float32),
            class_names=[], feature_shape=shape, fingerprint=cache_fingerprint(pre.size, pre.mode), flip=False,
            overwrite=o.overwrite and shard_i == 0, compress=o.compress, dtype=DTYPE, shard_images=o.shard_images)
    if o.repair:
        repair_shards(store, echo, work="decode")
    mine, todo_rows, todo_df = writer_todo(store, df, shard_i, shard_n)

    written, elapsed = 0, 0.0
    if len(todo_rows):
        files = ImageDataset(todo_df, images, pre, classes=[]).files
        loader = DataLoader(ImageSteps(files, pre), batch_size=o.batch_size, shuffle=False, num_workers=o.workers,
                            worker_init_fn=worker_init)
        with write_errors(out, "image cache", "the images cached so far"):
            written, elapsed = fill_shards(store, mine, todo_rows, loader, lambda b: (b["image"].numpy(), None),
                                           desc=f"cache{f' {shard_i}/{shard_n}' if shard_n > 1 else ''}")
    store.close()
    with write_errors(out, "image cache", "the images cached so far"):
        remaining = mark_if_complete(out)
    return CacheResult(out, pre, written, remaining, remaining == 0, written / elapsed if elapsed else 0.0)
