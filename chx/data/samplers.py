"""Epoch samplers that are distributed-aware and resumable mid-epoch.

Each epoch's full index order is a pure function of ``(seed, epoch)``; a rank takes every
``world_size``-th index of it (the order is padded by wrapping so ranks get equal counts, as
``DistributedSampler`` does). ``set_epoch(epoch, start)`` skips the first ``start`` indices of this
rank's share, which is how a resumed run continues exactly where it stopped.

Every yielded item is ``(index, sample_seed)``: the dataset seeds its augmentation with
``sample_seed``, so an image's augmentation depends on (seed, epoch, position) only, not on how many
DataLoader workers there are or where a run was resumed.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Base: subclasses implement :meth:`epoch_order`."""

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError("a sampler needs at least one sample per epoch")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self.epoch_order(rng)
        total = self.per_rank * self.world_size
        order = np.resize(order, total)  # wrap-pad to a multiple of world_size
        positions = np.arange(total)[self.rank::self.world_size]
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**62, size=total)
        mine = order[self.rank::self.world_size]
        for i in range(self.start, len(mine)):
            yield int(mine[i]), int(seeds[positions[i]])


class ShuffleSampler(EpochSampler):
    """Every sample once per epoch, in a random order (or in order with ``shuffle=False``)."""

    def __init__(self, n: int, shuffle: bool = True, **kw):
        super().__init__(n, **kw)
        self.shuffle = shuffle

    def epoch_order(self, rng):
        return rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)


class ClassAwareSampler(EpochSampler):
    """Class-aware balanced sampling (Shen et al. 2016, as in CheXFusion).

    An epoch of ``num_samples`` draws cycles over the classes in a random order; each draw picks a
    random image that is positive for the current class (with replacement). Classes without a
    positive are skipped. ``labels``: [N, K] with NaN = not annotated; soft labels count as positive
    at >= 0.5.
    """

    def __init__(self, labels: np.ndarray, num_samples: int | None = None, **kw):
        labels = np.asarray(labels, dtype=np.float64)
        positive = np.nan_to_num(labels, nan=0.0) >= 0.5
        self.pools = [np.flatnonzero(positive[:, c]) for c in range(labels.shape[1])]
        self.pools = [p for p in self.pools if len(p)]
        if not self.pools:
            raise ValueError("class-aware sampling needs at least one positive label")
        super().__init__(num_samples or len(labels), **kw)

    def epoch_order(self, rng):
        n, k = self.num_samples, len(self.pools)
        class_order = np.concatenate([rng.permutation(k) for _ in range(math.ceil(n / k))])[:n]
        picks = rng.random(n)
        sizes = np.array([len(p) for p in self.pools])
        within = (picks * sizes[class_order]).astype(np.int64)
        return np.array([self.pools[c][j] for c, j in zip(class_order, within)], dtype=np.int64)
