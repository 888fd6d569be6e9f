"""Losses by name (`--loss wasl|asl|db|bce`): the distribution-balanced loss against hand-computed
values and against a transcription of the authors' ResampleLoss code path; ASL and BCE; NaN and
soft labels; the one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chx.errors import ChxError
from chx.losses import (BCELoss, DistributionBalancedLoss, WeightedASL, distribution_balanced, make_loss,
                        weighted_asl)

PRIOR = [0.5, 0.2, 0.1]
Z = [[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]]
Y = [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def _db_by_hand(z, y, prior, alpha=0.1, beta=10.0, mu=0.3, kappa=0.05, lam=2.0, gamma=2.0, scale=2.0):
    """The DB loss element by element with the math module (0/1 labels, none missing)."""
    total, count = 0.0, 0
    for zb, yb in zip(z, y):
        repeat = sum(1.0 / p for p, t in zip(prior, yb) if t == 1)
        for zi, yi, pi in zip(zb, yb, prior):
            r = (1.0 / pi) / repeat if repeat else math.inf
            w = alpha + (1.0 if r == math.inf else _sig(beta * (r - mu)))
            zz = zi - kappa / lam * math.log(1.0 / pi - 1.0)
            if yi == 1:
                q = _sig(zz)
                term = -((1 - q) ** gamma) * math.log(q)
            else:
                q = _sig(lam * zz)
                term = -(1.0 / lam) * q ** gamma * math.log(1 - q)
            total += scale * w * term
            count += 1
    return total / count


def test_db_matches_hand_computed_values_on_a_2x3_example():
    got = float(distribution_balanced(torch.tensor(Z), torch.tensor(Y), torch.tensor(PRIOR)))
    assert got == pytest.approx(_db_by_hand(Z, Y, PRIOR), rel=1e-6)
    assert got == pytest.approx(0.331811080, rel=1e-6)   # the hand computation's value, frozen
    # the pieces, written out: sample 0 has positives 0 and 2: 1/p = 2, 5, 10; sum over positives 12
    r0 = [2 / 12, 5 / 12, 10 / 12]
    w0 = [0.1 + _sig(10 * (r - 0.3)) for r in r0]
    assert w0[0] == pytest.approx(0.1 + 1 / (1 + math.exp(4 / 3)), rel=1e-9)
    # sample 1 has no positive: r = inf, weight alpha + 1 = 1.1 for every class
    b = [-(0.05 / 2) * math.log(1 / p - 1) for p in PRIOR]
    assert b[0] == 0.0 and b[2] == pytest.approx(-0.025 * math.log(9))
    # element (0, 0): positive, z' = 0.5
    q = _sig(0.5)
    e00 = 2 * w0[0] * (1 - q) ** 2 * -math.log(q)
    # element (1, 1): negative, z' = 1 + b1, scaled by lambda 2
    q = _sig(2 * (1.0 + b[1]))
    e11 = 2 * 1.1 * 0.5 * q ** 2 * -math.log(1 - q)
    # row 1 has no positive, so its weight is 1.1 whatever else is annotated: element (1, 1) alone
    only = torch.full((2, 3), float("nan"))
    only[1, 1] = 0.0
    assert float(distribution_balanced(torch.tensor(Z), only, torch.tensor(PRIOR))) == pytest.approx(e11, rel=1e-6)
    # element (0, 0) alone: row 0's only annotated positive is then class 0 (r = 1, weight 0.1 + sig(7))
    only = torch.full((2, 3), float("nan"))
    only[0, 0] = 1.0
    w = 0.1 + _sig(10 * (1 - 0.3))
    assert float(distribution_balanced(torch.tensor(Z), only, torch.tensor(PRIOR))) == pytest.approx(
        e00 / w0[0] * w, rel=1e-6)


def _authors_resample_loss(z, y, prior, alpha=0.1, beta=10.0, mu=0.3, init_bias=0.05, neg_scale=2.0,
                           gamma=2.0, balance=2.0):
    """A transcription of the authors' ResampleLoss forward (reweight 'rebalance', focal, logit_reg)
    with N = 1 (class_freq = prior, train_num = 1), then the mean."""
    freq = torch.tensor(prior)
    freq_inv = 1.0 / freq
    repeat_rate = torch.sum(y * freq_inv, dim=1, keepdim=True)
    pos_weight = freq_inv.unsqueeze(0) / repeat_rate
    weight = torch.sigmoid(beta * (pos_weight - mu)) + alpha
    bias = -torch.log(1.0 / freq - 1) * init_bias / neg_scale
    logits = z + bias
    logits = logits * (1 - y) * neg_scale + logits * y
    weight = weight / neg_scale * (1 - y) + weight * y
    logpt = -F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    pt = torch.exp(logpt)
    loss = F.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="none")
    return (balance * (1 - pt) ** gamma * loss).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_db_is_the_authors_resample_loss_on_hard_labels(seed):
    g = torch.Generator().manual_seed(seed)
    prior = (torch.rand(5, generator=g) * 0.6 + 0.02).tolist()
    z = torch.randn(6, 5, generator=g) * 3
    y = (torch.rand(6, 5, generator=g) < 0.3).float()
    y[0] = 0
    y[0, 1] = 1   # at least one row with a positive; rows without any have r = inf in both
    got = distribution_balanced(z, y, torch.tensor(prior))
    torch.testing.assert_close(got, _authors_resample_loss(z, y, prior), rtol=1e-5, atol=1e-6)


def test_db_ignores_missing_labels_and_reads_soft_labels_as_expected_loss():
    prior = torch.tensor(PRIOR)
    z = torch.tensor(Z, requires_grad=True)
    y = torch.tensor(Y)
    with_nan = y.clone()
    with_nan[1, 2] = float("nan")
    a = distribution_balanced(z, with_nan, prior)
    # the mean over the 5 annotated elements: the same sum as the full loss minus element (1, 2)
    full_sum = distribution_balanced(z, y, prior) * 6
    only_12 = torch.full((2, 3), float("nan"))
    only_12[1, 2] = 0.0
    torch.testing.assert_close(a * 5, full_sum - distribution_balanced(z, only_12, prior))
    a.backward()
    assert torch.isfinite(z.grad).all() and z.grad[1, 2] == 0
    # a soft label in a row without positives (weight fixed at 1.1): linear in y
    z2 = torch.tensor([[0.3, -0.2, 1.5]])

    def row(t):
        return distribution_balanced(z2, torch.tensor([[float("nan"), float("nan"), t]]), prior)
    soft = row(0.25)
    assert torch.isfinite(soft)
    # y = 0.25 makes the row a fractional positive one: sum of y/p = 0.25 x 10, r = 10 / 2.5 = 4
    w = 0.1 + _sig(10 * (4.0 - 0.3))
    zz = 1.5 - 0.025 * math.log(9)
    pos = -((1 - _sig(zz)) ** 2) * math.log(_sig(zz))
    neg = -0.5 * _sig(2 * zz) ** 2 * math.log(1 - _sig(2 * zz))
    assert float(soft) == pytest.approx(2 * w * (0.25 * pos + 0.75 * neg), rel=1e-6)


def test_db_is_finite_for_extreme_logits_and_unseen_classes():
    prior = torch.tensor([0.0, 1.0, 0.3])     # a class without positives, one without negatives
    z = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 5.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    loss = distribution_balanced(z, y, prior)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_asl_is_the_weighted_asl_without_class_weights():
    prior = torch.tensor([0.05, 0.5])
    z = torch.tensor([[1.0, -2.0]])
    for y, w in ((torch.tensor([[1.0, float("nan")]]), math.exp(1 - 0.05)),
                 (torch.tensor([[float("nan"), 0.0]]), math.exp(0.5))):
        wasl = weighted_asl(z, y, prior)
        asl = weighted_asl(z, y, prior, class_weights=False)
        assert float(wasl) == pytest.approx(w * float(asl), rel=1e-6)
    assert isinstance(make_loss("asl", prior), WeightedASL) and not make_loss("asl", prior).class_weights
    assert make_loss("wasl", prior).class_weights


def test_bce_is_binary_cross_entropy_over_annotated_elements():
    z = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, -0.4]])
    y = torch.tensor([[1.0, float("nan"), 0.0], [0.7, 0.0, float("nan")]])
    keep = ~torch.isnan(y)
    want = F.binary_cross_entropy_with_logits(z[keep], y[keep])
    torch.testing.assert_close(make_loss("bce", torch.tensor(PRIOR))(z, y), want)


def test_make_loss_names_and_refusals():
    prior = np.array(PRIOR)
    assert isinstance(make_loss("db", prior), DistributionBalancedLoss)
    assert isinstance(make_loss("bce", prior), BCELoss)
    with pytest.raises(ChxError, match="--loss"):
        make_loss("focal", prior)
    for name in ("db", "bce"):
        with pytest.raises(ChxError, match="--soft-targets reference") as e:
            make_loss(name, prior, soft_targets="reference")
        assert "\n" not in str(e.value)
    assert make_loss("wasl", prior, soft_targets="reference").soft_targets == "reference"


@pytest.mark.parametrize("name", ["wasl", "asl", "db", "bce"])
def test_make_objective_builds_each_loss(name):
    from chx.engine.distributed import setup_distributed
    from chx.engine.objective import make_objective

    labels = np.array([[1, 0, np.nan], [0, 1, 0], [1, 0, 1], [0.6, 0, 0]], dtype=np.float32)
    obj = make_objective(labels, ["a", "b", "c"], balance=False, seed=0, ddp=setup_distributed("cpu"),
                         loss=name)
    z = torch.zeros(4, 3, requires_grad=True)
    loss = obj.loss(z, torch.from_numpy(labels))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
