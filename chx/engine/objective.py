"""What both training stages set up the same way: the class prior of the training labels, the
loss built on it (``--loss``: weighted ASL by default), the epoch sampler, and the class-prior
baseline of the validation set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chx.data.samplers import ClassAwareSampler, EpochSampler, ShardShuffleSampler, ShuffleSampler
from chx.engine.distributed import Distributed
from chx.losses import DEFAULT_LOSS, class_prior, make_loss
from chx.metrics import DEFAULT_GROUPS, prior_baseline, summarize


@dataclass
class Objective:
    prior: np.ndarray              # [K] positive rate of the training labels
    train_counts: np.ndarray       # [K] training positives (soft labels count at >= 0.5)
    loss: torch.nn.Module          # the --loss module (chx.losses.make_loss)
    sampler: EpochSampler

    def meta(self) -> dict:
        """What every checkpoint records about the objective."""
        return {"class_prior": [float(p) for p in self.prior],
                "train_counts": [int(n) for n in self.train_counts]}

    def scorer(self, val_labels: np.ndarray, class_names: list[str]):
        """``score(probs) -> metrics``: macro/group metrics on the validation labels, plus the
        class-prior baseline (the floor a model must beat)."""
        baseline = prior_baseline(self.prior, val_labels, class_names)

        def score(probs: np.ndarray) -> dict:
            return {**summarize(probs, val_labels, class_names, train_counts=self.train_counts,
                                groups=DEFAULT_GROUPS, prevalence=self.prior), **baseline}
        return score


def make_objective(train_labels: np.ndarray, class_names: list[str], *, balance: bool, seed: int,
                   ddp: Distributed, unit: str = "image", warn=None, shard_of_item: np.ndarray | None = None,
                   buffer_shards: int = 4, lanes: int = 1, batch_size: int = 1, loss: str = DEFAULT_LOSS,
                   **loss_options) -> Objective:
    """Prior, loss and sampler from the training labels [N, K] (NaN = not annotated). ``warn`` gets a
    message naming classes without a positive ``unit`` (they cannot be learned).

    Sampler: class-aware with ``balance``; else a shard-local shuffle when ``shard_of_item`` (each
    item's store shard: a streaming reader) is given, dealt into ``lanes`` streams of ``batch_size``
    batches (one per DataLoader worker: each shard read by one worker), each stream mixing
    ``buffer_shards`` shards at a time (:class:`ShardShuffleSampler`); else a plain shuffle. ``loss``: a name of
    :data:`chx.losses.LOSSES`, built on the prior with ``loss_options`` (e.g. ``soft_targets``)."""
    train_labels = np.asarray(train_labels, dtype=np.float32)
    counts = np.nansum(train_labels >= 0.5, axis=0)
    zero = [c for c, n in zip(class_names, counts) if n == 0]
    if zero and warn is not None and ddp.is_main:
        warn(f"warning: {len(zero)} class(es) have no positive training {unit} and cannot be "
             f"learned: {', '.join(zero)}")
    prior = class_prior(train_labels)
    loss_fn = make_loss(loss, torch.as_tensor(prior, dtype=torch.float32), **loss_options).to(ddp.device)
    kw = dict(seed=seed, rank=ddp.rank, world_size=ddp.world_size)
    if balance:
        sampler = ClassAwareSampler(train_labels, **kw)
    elif shard_of_item is not None:
        sampler = ShardShuffleSampler(np.asarray(shard_of_item), buffer_shards=buffer_shards * lanes, lanes=lanes,
                                      batch_size=batch_size, **kw)
    else:
        sampler = ShuffleSampler(len(train_labels), **kw)
    return Objective(prior, counts, loss_fn, sampler)
