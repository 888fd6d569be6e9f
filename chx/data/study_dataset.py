"""Stage-2 dataset: one item per study, read from the feature store only (no image, no backbone).

View handling: at most ``max_views`` views per study. Training takes a random subset when a study
has more, in a random order (``shuffle=False`` keeps the deterministic order, to ablate). Evaluation
and prediction use a deterministic choice and order: frontal first (PA, AP), then lateral (LATERAL,
LL), then other, ties by image id; so the same study always gets the same output (the reference
code drew a random subset at inference).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from chx.data.manifest import FRONTAL_VIEWS, LATERAL_VIEWS
from chx.models.fusion import VIEW_TYPES
from chx.store import open_store

VIEW_RANK = {"PA": 0, "AP": 1, "LATERAL": 2, "LL": 3, "OTHER": 4}


def deterministic_view_order(views: list[str], image_ids: list[str]) -> list[int]:
    """Indices of a study's views: frontal first, then lateral, then other; ties by image id."""
    return sorted(range(len(views)), key=lambda i: (VIEW_RANK.get(views[i], 5), image_ids[i]))


class StudyDataset(Dataset):
    """Items: ``features`` [V, C, H, W] float32, ``view_types`` [V] long, ``target`` [K] (NaN = not
    annotated), ``ids`` (study_id), ``index``. Indexing with ``(index, seed)`` seeds the view
    subset/order and the flip choice for training.

    ``views``: "all", "frontal" or "lateral": keep only those views (robustness checks); studies
    left without a view are dropped. ``preload``: hold the split's features in memory. ``flip_aug``: in training, use the store's flipped features
    (when it has them) for a random half of the studies.
    """

    def __init__(self, store_path, split: str | None, max_views: int = 4, train: bool = False,
                 shuffle: bool = True, views: str = "all", flip_aug: bool = True,
                 use_flip: bool = False, preload: bool = False):
        self.store_path = store_path
        self.max_views = max_views
        self.train = train
        self.shuffle = shuffle
        self.flip_aug = flip_aug
        self.use_flip = use_flip          # evaluation: return the flipped features instead
        self._store, self._pid = None, None
        store = self.store
        self.has_flip = store.has_flip
        studies = store.study_indices(split)
        self.keep = {"all": None, "frontal": FRONTAL_VIEWS, "lateral": LATERAL_VIEWS}[views]
        if self.keep is not None:
            ptr, v = store.study_ptr, np.asarray(store.views)
            studies = np.array([s for s in studies if np.isin(v[ptr[s]:ptr[s + 1]], self.keep).any()],
                               dtype=np.int64)
        self.studies = np.asarray(studies, dtype=np.int64)
        self.labels = np.asarray(store.labels, dtype=np.float32)[self.studies]
        self.study_ids = [store.study_ids[s] for s in self.studies]
        # preload: read the split's studies into memory once (small stores: every later epoch
        # then costs compute only, no store I/O).
        self.cache = [store.read_study(int(s)) for s in self.studies] if preload else None

    @property
    def store(self):
        # Opened lazily per process: store handles (HDF5 above all) must not cross a fork.
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = open_store(self.store_path), os.getpid()
        return self._store

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_store"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.studies)

    def choose_views(self, views: list[str], image_ids: list[str], seed: int | None) -> list[int]:
        candidates = [i for i in range(len(views)) if self.keep is None or views[i] in self.keep]
        order = [i for i in deterministic_view_order(views, image_ids) if i in candidates]
        if not (self.train and seed is not None):
            return order[: self.max_views]
        rng = np.random.default_rng(seed)
        if len(order) > self.max_views:
            chosen = set(rng.choice(len(order), self.max_views, replace=False).tolist())
            order = [o for j, o in enumerate(order) if j in chosen]
        if self.shuffle:
            order = [order[j] for j in rng.permutation(len(order))]
        return order

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        study = (self.cache[index] if self.cache is not None
                 else self.store.read_study(int(self.studies[index])))
        pick = self.choose_views(study.views, study.image_ids, seed)
        feats = study.features
        flip = self.use_flip
        if self.train and seed is not None and self.flip_aug and self.has_flip:
            flip = bool(np.random.default_rng([seed, 7]).random() < 0.5)
        if flip and study.features_flip is not None:
            feats = study.features_flip
        return {
            "features": torch.from_numpy(np.asarray(feats[pick], dtype=np.float32)),
            "view_types": torch.tensor([VIEW_TYPES.get(study.views[i], 2) for i in pick], dtype=torch.long),
            "target": torch.from_numpy(np.asarray(study.labels, dtype=np.float32)),
            "ids": study.study_id,
            "index": index,
        }


def collate_studies(batch: list[dict], pad_to: int | None = None) -> dict:
    """Stack studies, padding the view axis to the batch's largest study (or ``pad_to``)."""
    v = max(pad_to or 0, max(len(b["view_types"]) for b in batch))
    c, h, w = batch[0]["features"].shape[1:]
    features = torch.zeros(len(batch), v, c, h, w)
    mask = torch.zeros(len(batch), v, dtype=torch.bool)
    types = torch.full((len(batch), v), 2, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["view_types"])
        features[i, :n] = b["features"]
        mask[i, :n] = True
        types[i, :n] = b["view_types"]
    return {"features": features, "view_mask": mask, "view_types": types,
            "target": torch.stack([b["target"] for b in batch]),
            "ids": [b["ids"] for b in batch], "index": torch.tensor([b["index"] for b in batch])}
