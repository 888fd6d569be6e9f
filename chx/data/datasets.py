"""Torch datasets over a manifest (stage 1: one item per image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from chx.data.image_cache import ImageCache
from chx.data.images import load_image
from chx.data.manifest import class_columns
from chx.data.transforms import Preprocess, eval_transform, train_transform
from chx.errors import ChxError


def label_matrix(df: pl.DataFrame, classes: list[str]) -> np.ndarray:
    """[N, K] float32 labels with NaN for null (not annotated)."""
    if not classes:
        return np.zeros((df.height, 0), np.float32)
    return df.select(classes).cast(pl.Float32).to_numpy().astype(np.float32)


def check_paths(df: pl.DataFrame, source: str = "manifest") -> None:
    """Refuse paths that are absolute or climb out of the images root (``../../etc/passwd``)."""
    p = df["path"]
    bad = p.str.starts_with("/") | p.str.contains(r"(^|[\\/])\.\.([\\/]|$)") | p.str.contains(r"^[A-Za-z]:")
    if bad.any():
        i = int(bad.arg_true()[0])
        raise ChxError(f"{source}: row {i + 1} (image_id {df['image_id'][i]}), column path: "
                       f"{p[i]!r} leaves the images root; paths must be relative to --images "
                       f"without '..'")


class ImageDataset(Dataset):
    """Images of a manifest, decoded, resized and (for training) augmented.

    Items are dicts: ``image`` [1, S, S] float32 (normalised), ``target`` [K] float32 (NaN = not
    annotated), ``index`` (row in the manifest), ``ids`` (its image_id). Indexing with ``(index, seed)`` (what the chx
    samplers yield) seeds the augmentation of that item, making training reproducible and exactly
    resumable whatever the number of workers.

    ``cache`` (:class:`~chx.data.image_cache.ImageCache`, ``--images-cache``): read each image from
    it instead of its file (the same tensor, exactly); every image id must be in it, and the
    original files are then not needed (``images_root`` may be None).

    ``device_augment`` (training, ``--augment-on device``): items hold the image un-augmented in
    [0, 1] and its ``seed`` (the sample seed; the index without one), and
    :class:`~chx.data.batch_augment.BatchAugment` augments and normalises the batch on the device.
    """

    def __init__(self, df: pl.DataFrame, images_root: str | Path | list | None, pre: Preprocess,
                 train: bool = False, classes: list[str] | None = None, augment: dict | None = None,
                 cache: ImageCache | None = None, device_augment: bool = False):
        check_paths(df)
        # One root for all rows, or one per row (several manifests with their own roots).
        roots = images_root if isinstance(images_root, list) else [images_root] * df.height
        self.files = [Path(r or "") / p for r, p in zip(roots, df["path"].to_list())]
        self.image_ids = df["image_id"].to_list()
        self.cache = cache
        self.cache_rows = cache.rows_of(self.image_ids) if cache is not None else None
        self.classes = classes if classes is not None else class_columns(df)
        self.labels = torch.from_numpy(label_matrix(df, self.classes))
        self.pre = pre
        self.train = train
        # augment: train_transform's options (clahe, coarse_dropout); training only
        self.transform = train_transform(pre, **(augment or {})) if train else eval_transform(pre)
        self.device_augment = train and device_augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = (load_image(self.files[index], self.pre.size, self.pre.mode) if self.cache is None
                 else self.cache.read(self.cache_rows[index]))
        if self.device_augment:
            return {"image": image, "seed": index if seed is None else seed, "target": self.labels[index],
                    "index": index, "ids": self.image_ids[index]}
        if self.train and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        else:
            image = self.transform(image)
        return {"image": image, "target": self.labels[index], "index": index,
                "ids": self.image_ids[index]}

    def require_files(self, what: str = "") -> None:
        """Fail up front (before hours of work) when image files are missing, naming one (none are
        needed when the images come from a cache)."""
        if self.cache is not None:
            return
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise ChxError(f"{len(missing):,} {what + ' ' if what else ''}image file(s) are missing, e.g. "
                           f"{missing[0]}; check --images (paths in the manifest are relative to it)")
