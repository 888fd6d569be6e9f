"""Samplers: deterministic per (seed, epoch), disjoint across ranks, resumable mid-epoch."""

from __future__ import annotations

import numpy as np

from chx.data.samplers import ClassAwareSampler, ShuffleSampler


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
