"""Samplers: deterministic per (seed, epoch), disjoint across ranks, resumable mid-epoch."""

from __future__ import annotations

import numpy as np
import torch

from chx.data.samplers import ClassAwareSampler, ShardShuffleSampler, ShuffleSampler


def test_shuffle_sampler_is_a_permutation_per_epoch_and_seeded():
    s = ShuffleSampler(10, seed=1)
    first = [i for i, _ in s]
    assert sorted(first) == list(range(10))
    assert first == [i for i, _ in s]
    s.set_epoch(1)
    assert [i for i, _ in s] != first


def test_ranks_are_disjoint_and_cover_the_epoch():
    parts = [list(ShuffleSampler(11, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 6  # padded to equal length, as DistributedSampler
    seen = [i for p in parts for i, _ in p]
    assert set(seen) == set(range(11))


def test_start_skips_exactly_the_consumed_items():
    s = ShuffleSampler(20, seed=4)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=7)
    assert list(s) == full[7:]
    assert len(s) == 13


def test_sample_seeds_depend_on_position_not_on_rank_count():
    one = list(ShuffleSampler(8, seed=0))
    two = [list(ShuffleSampler(8, seed=0, rank=r, world_size=2)) for r in range(2)]
    interleaved = [x for pair in zip(*two) for x in pair]
    assert interleaved == one


def test_class_aware_sampler_balances_rare_classes():
    labels = np.zeros((1000, 3), np.float32)
    labels[:900, 0] = 1          # head
    labels[900:990, 1] = 1       # medium
    labels[990:, 2] = 1          # tail: 10 images
    labels[5, 2] = np.nan        # not annotated: never a positive
    s = ClassAwareSampler(labels, seed=0)
    idx = np.array([i for i, _ in s])
    assert len(idx) == 1000
    share = [(labels[idx, c] == 1).mean() for c in range(3)]
    assert all(abs(x - 1 / 3) < 0.02 for x in share), share
    assert set(idx[labels[idx, 2] == 1]) <= set(range(990, 1000))


def test_class_aware_sampler_skips_classes_without_positives():
    labels = np.array([[1, 0], [1, 0], [0, 0]], np.float32)
    idx = [i for i, _ in ClassAwareSampler(labels, num_samples=6, seed=0)]
    assert set(idx) <= {0, 1}


# ---------------------------------------------------------------------------- shard-local shuffle
def _shards(n_shards=23, seed=0) -> np.ndarray:
    """shard_of_item for shards of uneven size (3-12 items), in store order."""
    sizes = np.random.default_rng(seed).integers(3, 13, n_shards)
    return np.repeat(np.arange(n_shards), sizes)


def _lru_loads(shard_seq, capacity: int) -> int:
    """Shard reads of a reader that keeps the last `capacity` shards."""
    cache, loads = [], 0
    for s in shard_seq:
        if s in cache:
            cache.remove(s)
        else:
            loads += 1
            if len(cache) == capacity:
                cache.pop(0)
        cache.append(s)
    return loads


def test_shard_shuffle_visits_every_item_once_per_epoch_and_is_seeded():
    shard_of = _shards()
    s = ShardShuffleSampler(shard_of, buffer_shards=3, seed=5)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(len(shard_of)))
    assert first == list(ShardShuffleSampler(shard_of, buffer_shards=3, seed=5))
    assert [i for i, _ in ShardShuffleSampler(shard_of, buffer_shards=3, seed=6)] != [i for i, _ in first]
    s.set_epoch(1)
    second = [i for i, _ in s]
    assert sorted(second) == list(range(len(shard_of))) and second != [i for i, _ in first]


def test_shard_shuffle_resumes_exactly_from_any_start():
    for kw in ({}, {"lanes": 3, "batch_size": 4}, {"rank": 1, "world_size": 3}):
        s = ShardShuffleSampler(_shards(), buffer_shards=2, seed=1, **kw)
        s.set_epoch(3)
        full = list(s)
        for start in range(len(full) + 1):
            s.set_epoch(3, start=start)
            assert list(s) == full[start:] and len(s) == len(full) - start


def test_shard_shuffle_is_shard_local():
    shard_of = _shards(40)
    for b in (1, 2, 4):
        for epoch in range(3):
            s = ShardShuffleSampler(shard_of, buffer_shards=b, seed=0)
            s.set_epoch(epoch)
            seq = shard_of[[i for i, _ in s]]
            # a reader holding `buffer_shards` shards reads each shard once per epoch ...
            assert _lru_loads(seq, b) == 40
            # ... and any window of buffer_shards * (smallest shard) items spans at most two buffers
            w = b * np.bincount(shard_of).min()
            assert max(len(set(seq[i:i + w])) for i in range(len(seq))) <= 2 * b
            # one shard per buffer: each shard is one run; more: the buffer's shards interleave
            runs = 1 + np.count_nonzero(np.diff(seq))
            assert runs == 40 if b == 1 else runs > 40


def test_shard_shuffle_ranks_partition_the_epoch_into_shard_local_blocks():
    shard_of = _shards(30)
    n = len(shard_of)
    single = list(ShardShuffleSampler(shard_of, buffer_shards=2, seed=3))
    parts = [list(ShardShuffleSampler(shard_of, buffer_shards=2, seed=3, rank=r, world_size=4)) for r in range(4)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == -(-n // 4)
    # contiguous blocks of the one-process order (same items, same sample seeds), wrap-padded
    assert [x for p in parts for x in p] == (single + single)[:4 * len(parts[0])]
    for p in parts:
        seq = shard_of[[i for i, _ in p]]
        assert _lru_loads(seq, 2) <= len(set(seq)) + 2    # each rank streams its own shards once


def test_lanes_deal_each_shard_to_one_lane_and_keep_the_items():
    shard_of, lanes, bs = _shards(60), 3, 4
    plain = list(ShardShuffleSampler(shard_of, buffer_shards=6, seed=2))
    dealt = list(ShardShuffleSampler(shard_of, buffer_shards=6, seed=2, lanes=lanes, batch_size=bs))
    assert sorted(dealt) == sorted(plain)                  # same items with the same sample seeds
    seq = shard_of[[i for i, _ in dealt]]
    n_batches = len(seq) // bs
    worker_of_batch = np.arange(n_batches) % lanes         # the DataLoader's round-robin
    owners = {}
    for j in range(n_batches):
        for shard in set(seq[j * bs:(j + 1) * bs]):
            owners.setdefault(shard, set()).add(worker_of_batch[j])
    shared = {s for s, w in owners.items() if len(w) > 1}
    # streams differ by less than one shard, so only the last few batches may mix them
    tail = lanes * (-(-np.bincount(shard_of).max() // bs) + 1)
    assert not shared & set(seq[:(n_batches - tail) * bs])
    for w in range(lanes):
        mine = np.concatenate([seq[j * bs:(j + 1) * bs] for j in range(w, n_batches, lanes)])
        assert _lru_loads(mine, 6) <= len(set(mine)) + lanes


class _WorkerOf(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6

    def __getitem__(self, item):
        return torch.utils.data.get_worker_info().id


def test_dataloader_sends_batch_j_to_worker_j_mod_num_workers():
    # what ShardShuffleSampler(lanes=num_workers) relies on
    sampler = ShuffleSampler(48, seed=0)
    loader = torch.utils.data.DataLoader(_WorkerOf(), batch_size=4, sampler=[i for i, _ in sampler],
                                         num_workers=2, multiprocessing_context="fork")
    assert [int(b[0]) for b in loader] == [j % 2 for j in range(12)]
