import math

import numpy as np
import pytest
import torch

from chx.losses import WeightedASL, class_prior, weighted_asl

NAN = float("nan")
LOGITS = [[2.0, -1.0, 0.5], [-3.0, 0.3, 1.5]]
TARGETS = [[1.0, 0.0, 0.7], [0.0, NAN, 1.0]]   # one soft target, one not annotated
PRIOR = [0.2, 0.5, 0.05]


def _hand_loss(reduction, gamma_pos=1.0, gamma_neg=4.0, clip=0.05):
    total, count = 0.0, 0
    for row_x, row_y in zip(LOGITS, TARGETS):
        for x, y, pc in zip(row_x, row_y, PRIOR):
            if math.isnan(y):
                continue
            p = 1 / (1 + math.exp(-x))
            p_m = max(p - clip, 0.0)
            pos = y * math.exp(1 - pc) * (1 - p) ** gamma_pos * math.log(p)
            neg = (1 - y) * math.exp(pc) * p_m ** gamma_neg * math.log(1 - p_m)
            total += -(pos + neg)
            count += 1
    return total / count if reduction == "mean" else total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_asl_equals_hand_computed_value(reduction):
    loss = weighted_asl(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(PRIOR),
                        reduction=reduction)
    assert loss.item() == pytest.approx(_hand_loss(reduction), rel=1e-5)


def test_module_matches_function_and_moves_prior():
    fn = WeightedASL(np.array(PRIOR), reduction="sum")
    assert "class_prior" in fn.state_dict()
    expected = weighted_asl(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(PRIOR), reduction="sum")
    assert fn(torch.tensor(LOGITS), torch.tensor(TARGETS)).item() == pytest.approx(expected.item())


def _extreme_logits(dtype=torch.float32):
    return torch.tensor([[100.0, -100.0, 100.0], [-100.0, 100.0, -100.0]], dtype=dtype, requires_grad=True)


def test_finite_under_bf16_autocast_with_extreme_logits():
    logits = _extreme_logits()
    targets = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, NAN]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_asl(logits @ torch.eye(3), targets, torch.tensor(PRIOR))  # bf16 matmul output
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_finite_for_float16_logits():
    logits = _extreme_logits(torch.float16)
    targets = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 1.0]])
    loss = weighted_asl(logits, targets, torch.tensor(PRIOR))
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert torch.isfinite(logits.grad).all()


def test_all_nan_rows_contribute_nothing():
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    extra = torch.cat([logits, torch.tensor([[5.0, -5.0, 9.0]])])
    extra_t = torch.cat([targets, torch.full((1, 3), NAN)])
    for reduction in ("mean", "sum"):
        a = weighted_asl(logits, targets, PRIOR, reduction=reduction)
        b = weighted_asl(extra, extra_t, PRIOR, reduction=reduction)
        assert b.item() == pytest.approx(a.item(), rel=1e-6)


def test_all_null_batch_gives_zero_with_grad():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = weighted_asl(logits, torch.full((2, 3), NAN), PRIOR)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_bad_reduction_rejected():
    with pytest.raises(ValueError, match="reduction"):
        weighted_asl(torch.zeros(1, 3), torch.zeros(1, 3), PRIOR, reduction="batchmean")


def test_class_prior_is_nan_aware_and_counts_soft_labels():
    labels = np.array([[1.0, 0.0, NAN, NAN],
                       [0.0, NAN, 0.5, NAN],
                       [1.0, 1.0, 1.0, NAN],
                       [NAN, 0.0, 0.0, NAN]])
    np.testing.assert_allclose(class_prior(labels), [2 / 3, 1 / 3, 1.5 / 3, 0.0])
