"""Stage 2a: `chx extract-features`, the frozen stage-1 backbone's feature maps -> feature store.

Resumable (only images not yet ``done`` are computed) and parallel: ``shard=(i, n)`` or torchrun
ranks fill disjoint images of one Zarr store. Images are decoded in DataLoader workers while the
model runs, and store writes happen in a background thread, so decoding and writing hide behind
the forward pass. The store is marked complete only when every image is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from chx.data.datasets import ImageDataset, label_matrix
from chx.data.manifest import class_columns, read_manifest
from chx.data.transforms import Preprocess
from chx.errors import ChxError
from chx.pipeline.inference import eval_weights, resolve_device
from chx.pipeline.pseudo_label import load_backbone
from chx.store import create_store, is_hdf5_path, local_path, open_store, projected_size


@dataclass
class ExtractResult:
    store: str
    written: int
    remaining: int
    complete: bool
    images_per_s: float


def weights_hash(state_dict: dict) -> str:
    """sha256 of the weights (names, shapes, bytes), independent of optimizer state or file."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n); torchrun's RANK/WORLD_SIZE when not given."""
    if shard is None:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ChxError(f"--shard {shard!r}: write it as i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ChxError(f"--shard {shard}: i must be in 0..n-1 (e.g. 0/{max(n, 2)} .. {max(n, 2) - 1}/{max(n, 2)})")
    return i, n


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


def extract_features(checkpoint: Path, manifest: Path, images: Path, store_path: str, *, pool: int = 1,
                     flip: bool = False, batch_size: int = 16, workers: int = 2, device: str = "auto",
                     shard: str | None = None, overwrite: bool = False, compress: bool = False,
                     echo=print) -> ExtractResult:
    shard_i, shard_n = parse_shard(shard)
    if pool < 1:
        raise ChxError(f"--pool {pool}: must be >= 1 (1 = no pooling)")
    if is_hdf5_path(store_path) and shard_n > 1:
        raise ChxError(f"HDF5 stores take one writer: --shard/torchrun cannot write {store_path}; "
                       f"use a Zarr store (a folder path, e.g. features.zarr) for parallel extraction")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))   # torchrun: one GPU per rank

    model, ckpt = load_backbone(checkpoint)
    df = read_manifest(manifest)
    classes = class_columns(df)
    if classes != list(ckpt["class_names"]):
        raise ChxError(f"{manifest} has other classes ({len(classes)}) than {checkpoint} "
                       f"({len(ckpt['class_names'])}); prepare the manifest onto the checkpoint's classes")
    pre = Preprocess.from_dict(ckpt["preprocess"])
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)

    with torch.no_grad():
        probe = model.forward_features(torch.zeros(1, 1, pre.size, pre.size, device=dev))
        probe = F.avg_pool2d(probe, pool) if pool > 1 else probe
    feature_shape = tuple(int(s) for s in probe.shape[1:])
    fingerprint = {
        "checkpoint_sha256": weights_hash(eval_weights(ckpt)),
        "model": ckpt["model_config"].get("backbone_name", ckpt["model_config"].get("name")),
        "input_size": pre.size, "resize": pre.mode, "layer": "last-stage",
        "pool": pool, "flip": flip, "dtype": "float16",
    }
    size = projected_size(df.height, feature_shape, flip)
    echo(f"store {store_path}: {df.height:,} images x {feature_shape} float16"
         f"{' (+ flipped)' if flip else ''} = {size / 2**20:,.1f} MiB projected on disk before compression")

    with _creation_lock(str(store_path)):
        store = create_store(
            store_path, image_ids=df["image_id"].to_list(), study_ids=df["study_id"].to_list(),
            views=df["view"].to_list(), splits=df["split"].fill_null("").to_list(),
            labels=label_matrix(df, classes), class_names=classes, feature_shape=feature_shape,
            fingerprint=fingerprint, flip=flip, overwrite=overwrite and shard_i == 0, compress=compress)

    rows_of_df = store.image_index(df["image_id"].to_list())      # manifest row -> store row
    todo_rows = np.asarray(store.missing_rows(), dtype=np.int64)
    todo_rows = todo_rows[todo_rows % shard_n == shard_i]
    df_pos = np.empty(store.n_images, dtype=np.int64)
    df_pos[rows_of_df] = np.arange(df.height)
    todo_df = df.select(pl.all().gather(df_pos[todo_rows].tolist()))

    written, elapsed = 0, 0.0
    if len(todo_rows):
        dataset = ImageDataset(todo_df, images, pre, train=False, classes=classes)
        dataset.require_files()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=dev.type == "cuda")
        t0 = time.perf_counter()
        with _store_errors(store_path), ThreadPoolExecutor(max_workers=1) as writer, torch.no_grad():
            pending = None
            for batch in tqdm(loader, desc=f"extract{f' {shard_i}/{shard_n}' if shard_n > 1 else ''}",
                              unit="batch", leave=False, disable=None):
                x = batch["image"].to(dev, non_blocking=True)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                feats = _features(model, x, pool)
                feats_flip = _features(model, torch.flip(x, dims=[-1]), pool) if flip else None
                rows = todo_rows[batch["index"].numpy()]
                if pending is not None:
                    pending.result()  # one write in flight: bounded memory, errors surface here
                pending = writer.submit(store.write, rows, feats, feats_flip)
                written += len(rows)
            if pending is not None:
                pending.result()
        elapsed = time.perf_counter() - t0

    store = open_store(store_path, mode="r+")
    remaining = len(store.missing_rows())
    if remaining == 0 and not store.complete:
        store.mark_complete()
    return ExtractResult(str(store_path), written, remaining, remaining == 0,
                         written / elapsed if elapsed else 0.0)


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


def _features(model, x, pool: int) -> np.ndarray:
    f = model.forward_features(x)
    if pool > 1:
        f = F.avg_pool2d(f.float(), pool)
    return f.to(torch.float16).cpu().numpy()
