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

import contextlib
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from chx.data.datasets import ImageDataset, label_matrix
from chx.data.manifest import class_columns, read_manifest
from chx.data.transforms import Preprocess
from chx.engine.compat import leakage_warning, require_same_classes
from chx.engine.distributed import resolve_device
from chx.engine.inference import feature_maps, load_backbone, model_to
from chx.errors import ChxError
from chx.models import eval_weights, weights_hash
from chx.options import ExtractOptions
from chx.store import ShardBuffer, backend_class, create_store, local_path, open_store, projected_size
from chx.workers import batches, worker_init


@dataclass
class ExtractResult:
    store: str
    written: int
    remaining: int
    complete: bool
    images_per_s: float


def parse_shard(shard: str | None, env=None) -> tuple[int, int]:
    """'i/n' -> (i, n); torchrun's RANK/WORLD_SIZE when not given; 'auto': a SLURM array task's
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT), else torchrun's, else ChxError."""
    env = os.environ if env is None else env
    if shard is None:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if shard.strip().lower() == "auto":
        return _auto_shard(env)
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ChxError(f"--shard {shard!r}: write it as i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ChxError(f"--shard {shard}: i must be in 0..n-1 (e.g. 0/{max(n, 2)} .. {max(n, 2) - 1}/{max(n, 2)})")
    return i, n


def _auto_shard(env) -> tuple[int, int]:
    """--shard auto. SLURM arrays: task ids run from SLURM_ARRAY_TASK_MIN (not always 0, e.g.
    --array=1-8) with step SLURM_ARRAY_TASK_STEP (--array=0-15:2), SLURM_ARRAY_TASK_COUNT tasks in
    all; an id list (--array=1,4,9) has no fixed step, so it is refused. Else torchrun's RANK/WORLD_SIZE."""
    def number(name):
        try:
            return int(env[name])
        except ValueError:
            raise ChxError(f"--shard auto: {name}={env[name]!r} is not a whole number") from None

    if env.get("SLURM_ARRAY_TASK_ID") not in (None, ""):
        if env.get("SLURM_ARRAY_TASK_COUNT") in (None, ""):
            raise ChxError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; run it "
                           "as a SLURM array job (sbatch --array=0-N) or give --shard i/n")
        task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
        low = number("SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN") not in (None, "") else 0
        step = number("SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") not in (None, "") else 1
        i, rest = divmod(task - low, max(step, 1))
        if count < 1 or rest or not 0 <= i < count:
            raise ChxError(f"--shard auto: SLURM array task {task} is not one of {count} evenly spaced tasks from "
                           f"{low} (step {step}); use --array=0-{max(count - 1, 0)} (a range, not a list) or give "
                           f"--shard i/n")
        return i, count
    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        i, n = number("RANK"), number("WORLD_SIZE")
        if n < 1 or not 0 <= i < n:
            raise ChxError(f"--shard auto: RANK={i} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={n})")
        return i, n
    raise ChxError("--shard auto: neither a SLURM array task (SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT) nor "
                   "torchrun (RANK/WORLD_SIZE) is set; run it as a SLURM array task or under torchrun, or give "
                   "--shard i/n")


@contextlib.contextmanager
def _creation_lock(store: str):
    """Serialise store creation between shard processes on one machine (local paths)."""
    path = local_path(store)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def extract_features(checkpoint: Path, manifest: Path, images: Path, store_path: str, *, echo=print,
                     **options) -> ExtractResult:
    """Fill ``store_path`` with the feature maps of the manifest's images; ``options`` are the
    fields of :class:`chx.options.ExtractOptions` (pool, flip, batch_size, workers, device, shard,
    compress, overwrite)."""
    opts = ExtractOptions(**options)
    opts.validate()
    pool, flip, batch_size, workers = opts.pool, opts.flip, opts.batch_size, opts.workers
    device, overwrite, compress = opts.device, opts.overwrite, opts.compress
    shard_i, shard_n = parse_shard(opts.shard)
    if opts.repair and shard_n > 1:
        raise ChxError("--repair runs in one process (it verifies the whole store first); run it without "
                       "--shard/torchrun")
    if shard_n > 1 and not backend_class(store_path).supports_parallel_writers:
        raise ChxError(f"HDF5 stores take one writer: --shard/torchrun cannot write {store_path}; "
                       f"use a Zarr store (a folder path, e.g. features.zarr) for parallel extraction")
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
    ImageDataset(df, images, pre, train=False, classes=classes).require_files()
    model_to(model, dev)

    probe = feature_maps(model, torch.zeros(1, 1, pre.size, pre.size, device=dev), pool)
    feature_shape = tuple(int(s) for s in probe.shape[1:])
    fingerprint = {
        "checkpoint_sha256": weights_hash(eval_weights(ckpt)),
        "model": ckpt["model_config"].get("backbone_name", ckpt["model_config"].get("name")),
        "input_size": pre.size, "resize": pre.mode, "layer": "last-stage",
        "pool": pool, "flip": flip, "dtype": opts.dtype,
    }
    size = projected_size(df.height, feature_shape, flip, opts.dtype)
    echo(f"store {store_path}: {df.height:,} images x {feature_shape} {opts.dtype}"
         f"{' (+ flipped)' if flip else ''} = {size / 2**20:,.1f} MiB projected on disk before compression")

    with _store_errors(store_path), _creation_lock(str(store_path)):
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
        report = store.verify()
        store.mark_shards_missing(report.bad_shards)
        echo(f"repair: {len(report.bad_shards):,} damaged shard(s) of {store.n_shards:,} to extract again"
             + (f" ({report.summary()})" if len(report.bad_shards) else ""))

    # This writer's shards that are not done yet, and their rows in store order.
    mine = np.intersect1d(store.shards_for_writer(shard_i, shard_n), store.missing_shards())
    todo_rows = (np.concatenate([np.arange(*store.shard_rows(s)) for s in mine]) if len(mine)
                 else np.zeros(0, dtype=np.int64))
    df_pos = np.empty(store.n_images, dtype=np.int64)
    df_pos[store.image_index(df["image_id"].to_list())] = np.arange(df.height)   # store row -> manifest row
    todo_df = df.select(pl.all().gather(df_pos[todo_rows].tolist()))

    written, elapsed = 0, 0.0
    if len(todo_rows):
        dataset = ImageDataset(todo_df, images, pre, train=False, classes=classes)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=dev.type == "cuda", worker_init_fn=worker_init)
        buffer = ShardBuffer(store, mine)
        t0 = time.perf_counter()
        with (_store_errors(store_path), ThreadPoolExecutor(max_workers=1) as writer, torch.no_grad(),
              batches(loader) as it):   # the workers end on any exit (before the writer is joined)
            pending = None
            for batch in tqdm(it, desc=f"extract{f' {shard_i}/{shard_n}' if shard_n > 1 else ''}",
                              unit="batch", leave=False, disable=None):
                x = batch["image"].to(dev, non_blocking=True)
                feats = feature_maps(model, x, pool).cpu().numpy()
                feats_flip = feature_maps(model, x, pool, flip=True).cpu().numpy() if flip else None
                rows = todo_rows[batch["index"].numpy()]
                if pending is not None:
                    written += _rows_in(store, pending.result())  # one write in flight: bounded memory
                pending = writer.submit(buffer.add, rows, feats, feats_flip)
            if pending is not None:
                written += _rows_in(store, pending.result())
        elapsed = time.perf_counter() - t0
    store.close()

    with _store_errors(store_path), open_store(store_path, mode="r+") as store:
        remaining = len(store.missing_rows())
        if remaining == 0 and not store.complete:
            store.mark_complete()
    return ExtractResult(str(store_path), written, remaining, remaining == 0,
                         written / elapsed if elapsed else 0.0)


def _rows_in(store, shards: list[int]) -> int:
    return sum(b - a for a, b in map(store.shard_rows, shards))


@contextlib.contextmanager
def _store_errors(store_path):
    """A failed store write (disk full, permissions) is one clear line; what was written before
    stays marked done, so rerunning the same command continues from there."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise ChxError(f"could not write to the feature store {store_path}: {reason}; the images "
                       f"written so far are kept: free space (or fix the cause) and rerun the same "
                       f"command to continue") from None
