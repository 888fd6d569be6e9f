"""Joint fine-tuning's dataset: one item per study, its views decoded from the images.

The same view handling as the fusion stage's :class:`~chx.data.study_dataset.StudyDataset`, by
construction (its ``choose_views``): at most ``max_views`` views per study; in training a random
subset when a study has more, in a random order (``shuffle=False`` keeps the deterministic order);
at evaluation the deterministic choice and order of :func:`chx.data.views.deterministic_view_order`.
Each view is decoded, resized and (in training) augmented as stage 1 does it
(:class:`~chx.data.datasets.ImageDataset`), each view with its own seed drawn from the item's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from chx.data.datasets import ImageDataset
from chx.data.study_dataset import StudyDataset
from chx.data.transforms import Preprocess
from chx.data.views import FRONTAL_VIEWS, LATERAL_VIEWS, OTHER_TYPE, view_type

KEEP_VIEWS = {"all": None, "frontal": FRONTAL_VIEWS, "lateral": LATERAL_VIEWS}


class StudyImageDataset(Dataset):
    """The studies of a manifest table (in order of their first row), from their image files.

    Items are dicts: ``images`` [n, 1, S, S] float32 (normalised; the chosen views in slot order),
    ``view_types`` [n] long, ``target`` [K] float32 (the study's labels, NaN = not annotated),
    ``ids`` (study id), ``index``. Indexing with ``(index, seed)`` (what the chx samplers yield)
    seeds the view choice, their order and each view's augmentation. ``views`` keeps only frontal
    or lateral views (studies without one are left out), as ``StudyDataset`` does.
    """

    # The fusion stage's choice, not a copy: it reads keep, train, max_views and shuffle.
    choose_views = StudyDataset.choose_views

    def __init__(self, df: pl.DataFrame, images_root: str | Path, pre: Preprocess, *, max_views: int = 4,
                 train: bool = False, shuffle: bool = True, views: str = "all",
                 classes: list[str] | None = None, cache=None, device_augment: bool = False):
        # cache: an ImageCache (--images-cache) the views are read from instead of their files;
        # device_augment (--augment-on device, training): views un-augmented in [0, 1] with their seeds
        self.images = ImageDataset(df, images_root, pre, train=train, classes=classes, cache=cache,
                                   device_augment=device_augment)
        self.max_views = max_views
        self.train = train
        self.shuffle = shuffle
        self.keep = KEEP_VIEWS[views]
        self.views = df["view"].to_list()
        studies = df.with_row_index("_row").group_by("study_id", maintain_order=True).agg(pl.col("_row"))
        rows = [np.asarray(r, dtype=np.int64) for r in studies["_row"].to_list()]
        ids = studies["study_id"].to_list()
        if self.keep is not None:
            has = [any(self.views[i] in self.keep for i in r) for r in rows]
            rows, ids = [r for r, h in zip(rows, has) if h], [s for s, h in zip(ids, has) if h]
        self.study_rows: list[np.ndarray] = rows
        self.study_ids: list[str] = ids
        first = [int(r[0]) for r in rows]    # labels are per study: every image carries them
        self.labels = self.images.labels[first].numpy() if rows else np.zeros((0, len(self.images.classes)),
                                                                               np.float32)

    def __len__(self) -> int:
        return len(self.study_rows)

    def require_files(self, what: str = "") -> None:
        self.images.require_files(what)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        rows = self.study_rows[index]
        views = [self.views[r] for r in rows]
        pick = self.choose_views(views, [self.images.image_ids[r] for r in rows], seed)
        augment = self.train and seed is not None
        items = [self.images[(int(rows[p]), _view_seed(seed, p)) if augment else int(rows[p])] for p in pick]
        out = {"images": torch.stack([it["image"] for it in items]),
               "view_types": torch.tensor([view_type(views[p]) for p in pick], dtype=torch.long),
               "target": torch.from_numpy(self.labels[index]), "ids": self.study_ids[index], "index": index}
        if self.images.device_augment:       # each view's seed, for BatchAugment on the device
            out["seeds"] = torch.tensor([int(it["seed"]) for it in items], dtype=torch.long)
        return out


def _view_seed(seed: int, position: int) -> int:
    """The augmentation seed of the study's view at ``position`` (its row among the study's)."""
    return int(np.random.default_rng([seed, 3, position]).integers(0, 2**62))


def collate_study_images(batch: list[dict]) -> dict:
    """Studies -> ``images`` [N, 1, S, S] (every real view, study after study, slot order: the
    backbone runs on no padding), ``view_mask`` [B, V] and ``view_types`` [B, V] (V = the batch's
    largest study; padding slots OTHER), ``target`` [B, K], ``ids``, ``index`` (and ``seeds`` [N] with
    ``--augment-on device``)."""
    v = max(len(b["view_types"]) for b in batch)
    mask = torch.zeros(len(batch), v, dtype=torch.bool)
    types = torch.full((len(batch), v), OTHER_TYPE, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["view_types"])
        mask[i, :n] = True
        types[i, :n] = b["view_types"]
    out = {"images": torch.cat([b["images"] for b in batch]), "view_mask": mask, "view_types": types,
           "target": torch.stack([b["target"] for b in batch]), "ids": [b["ids"] for b in batch],
           "index": torch.tensor([b["index"] for b in batch])}
    if "seeds" in batch[0]:                  # --augment-on device: one seed per row of images
        out["seeds"] = torch.cat([b["seeds"] for b in batch])
    return out
