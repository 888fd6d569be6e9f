"""Epoch samplers that are distributed-aware and resumable mid-epoch.

Each epoch's full index order is a pure function of ``(seed, epoch)``, wrap-padded so that every
rank gets the same count (as ``DistributedSampler`` does); :meth:`EpochSampler.rank_positions`
says which positions of it are this rank's share (every ``world_size``-th, unless a subclass keeps
shares contiguous). ``set_epoch(epoch, start)`` skips the first ``start`` items of this rank's
share, which is how a resumed run continues exactly where it stopped.

Every yielded item is ``(index, sample_seed)``: the dataset seeds its augmentation with
``sample_seed``, a function of (seed, epoch, position in the epoch order) only, so an item's
augmentation does not depend on how many ranks or DataLoader workers there are or where a run
was resumed.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

# Shards shuffled together by ShardShuffleSampler; a reader should cache one more than this.
DEFAULT_BUFFER_SHARDS = 4


class EpochSampler(Sampler):
    """Base: subclasses implement :meth:`epoch_order` (and may override :meth:`rank_positions`)."""

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
        """The epoch's item indices [num_samples] int64, drawn from ``rng`` only."""
        raise NotImplementedError

    def rank_positions(self, order: np.ndarray) -> np.ndarray:
        """Positions in the padded epoch ``order`` [per_rank * world_size] that form this rank's
        share, in the order this rank yields them: every ``world_size``-th position."""
        return np.arange(self.rank, len(order), self.world_size)

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
        total = self.per_rank * self.world_size
        order = np.resize(self.epoch_order(rng), total)  # wrap-pad to a multiple of world_size
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**62, size=total)
        for p in self.rank_positions(order)[self.start:]:
            yield int(order[p]), int(seeds[p])


class ShuffleSampler(EpochSampler):
    """Every sample once per epoch, in a random order (or in order with ``shuffle=False``)."""

    def __init__(self, n: int, shuffle: bool = True, **kw):
        super().__init__(n, **kw)
        self.shuffle = shuffle

    def epoch_order(self, rng):
        return rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)


class ShardShuffleSampler(EpochSampler):
    """Every item once per epoch in a shard-local random order, for a reader that streams whole
    store shards (:class:`chx.data.study_dataset.StudyDataset` caches the last few it read).

    ``shard_of_item``: [n_items] int, the store shard each item (dataset index) lives in. Each
    epoch the shard order is shuffled; consecutive shards of that order form buffers of
    ``buffer_shards``; the items of a buffer are shuffled together, buffer after buffer. So the
    items of one shard all fall inside one buffer's stretch of the order, and a reader that holds
    ``buffer_shards`` shards (an LRU of ``buffer_shards + 1`` to spare) reads each shard once per
    epoch. Mixing is bounded by the buffer: a batch holds items of at most ``buffer_shards`` shards
    (``2 * buffer_shards`` where it straddles two buffers).

    Ranks (DDP): rank ``r`` takes the contiguous block ``[r * per_rank, (r + 1) * per_rank)`` of the
    wrap-padded epoch order, not every ``world_size``-th item, so each rank's share is itself
    shard-local and each rank reads about ``1 / world_size`` of the shards. Counts per rank are
    equal; a buffer cut by a block boundary is read by both ranks (at most ``world_size - 1``
    buffers per epoch are read twice), and the padding items (the order's first few) are read by
    the last rank once more.

    DataLoader workers: the DataLoader sends batch ``j`` to worker ``j % num_workers`` and every
    worker holds its own cache, so in a plain shard-local order every worker reads every shard of
    the buffer (num_workers times the reads and the cache memory). With ``lanes=num_workers`` and
    the loader's ``batch_size``, each rank's share is dealt into ``lanes`` streams (each shard to
    one stream, least-loaded stream first) and batch ``j`` is taken from stream ``j % lanes``, so
    each shard goes to one worker. Cost: a batch then draws from about ``buffer_shards / lanes``
    shards, so raise ``buffer_shards`` with the workers (e.g. ``4 * lanes``) to keep batches mixed.
    ``lanes`` and ``batch_size`` are part of the order (record them with a run and reuse them on
    resume, even if the worker count changes); ``lanes=1`` (default) leaves the order alone. The
    last batches of a share, once the shorter streams run out, may mix streams.
    """

    def __init__(self, shard_of_item: np.ndarray, buffer_shards: int = DEFAULT_BUFFER_SHARDS, *,
                 lanes: int = 1, batch_size: int = 1, **kw):
        shard_of_item = np.asarray(shard_of_item).reshape(-1)
        if buffer_shards < 1 or lanes < 1 or batch_size < 1:
            raise ValueError("buffer_shards, lanes and batch_size must be >= 1")
        super().__init__(len(shard_of_item), **kw)
        # Shards renumbered 0..n_shards-1 (any integer labels work).
        self.shards, self.shard_index = np.unique(shard_of_item, return_inverse=True)
        self.buffer_shards = buffer_shards
        self.lanes = lanes
        self.batch_size = batch_size

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def epoch_order(self, rng):
        place = np.empty(self.n_shards, dtype=np.int64)
        place[rng.permutation(self.n_shards)] = np.arange(self.n_shards)   # shard -> place in order
        buffer_of_item = place[self.shard_index] // self.buffer_shards
        # Sort by buffer; a random permutation breaks ties, i.e. shuffles within each buffer.
        return np.lexsort((rng.permutation(self.num_samples), buffer_of_item))

    def rank_positions(self, order):
        block = np.arange(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        if self.lanes == 1:
            return block
        return block[self._deal_into_lanes(self.shard_index[order[block]])]

    def _deal_into_lanes(self, shard_seq: np.ndarray) -> np.ndarray:
        """A stable permutation of a share whose items' shards are ``shard_seq``: batch ``j`` of it
        comes from lane ``j % lanes`` only; each shard goes to one lane, whole."""
        shards, first = np.unique(shard_seq, return_index=True)
        counts = np.bincount(np.searchsorted(shards, shard_seq), minlength=len(shards))
        lane_of_shard = np.empty(len(shards), dtype=np.int64)
        load = np.zeros(self.lanes, dtype=np.int64)
        for s in np.argsort(first, kind="stable"):                 # shards in order of appearance
            lane_of_shard[s] = int(np.argmin(load))
            load[lane_of_shard[s]] += counts[s]
        lane = lane_of_shard[np.searchsorted(shards, shard_seq)]
        rank_in_lane = np.empty(len(shard_seq), dtype=np.int64)
        for k in range(self.lanes):
            mine = np.flatnonzero(lane == k)
            rank_in_lane[mine] = np.arange(len(mine))
        turn = (rank_in_lane // self.batch_size) * self.lanes + lane   # round-robin over lanes
        return np.argsort(turn, kind="stable")


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
