import math

import numpy as np
import pytest
import torch

from chx.losses import WeightedASL, class_prior, weighted_asl

NAN = float("nan")
LOGITS = [[2.0, -1.0, 0.5], [-3.0, 0.3, 1.5]]
TARGETS = [[1.0, 0.0, 0.7], [0.0, NAN, 1.0]]   # one soft target, one not annotated
PRIOR = [0.2, 0.5, 0.05]


def _hand_loss(reduction, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, soft_targets="expected"):
    total, count = 0.0, 0
    for row_x, row_y in zip(LOGITS, TARGETS):
        for x, y, pc in zip(row_x, row_y, PRIOR):
            if math.isnan(y):
                continue
            p = 1 / (1 + math.exp(-x))
            p_m = max(p - clip, 0.0)
            w_pos, w_neg = math.exp(1 - pc), math.exp(pc)
            if soft_targets == "expected":
                pos = y * w_pos * (1 - p) ** gamma_pos * math.log(p)
                neg = (1 - y) * w_neg * p_m ** gamma_neg * math.log(1 - p_m)
                total += -(pos + neg)
            else:  # the reference's ASLwithClassWeight: weight, log terms, exponent mixed by y
                weight = y * w_pos + (1 - y) * w_neg
                log_term = y * math.log(p) + (1 - y) * math.log(1 - p_m)
                p_t = y * p + (1 - y) * (1 - p_m)
                total += -weight * log_term * (1 - p_t) ** (y * gamma_pos + (1 - y) * gamma_neg)
            count += 1
    return total / count if reduction == "mean" else total


@pytest.mark.parametrize("soft_targets", ["expected", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_asl_equals_hand_computed_value(reduction, soft_targets):
    loss = weighted_asl(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(PRIOR),
                        reduction=reduction, soft_targets=soft_targets)
    assert loss.item() == pytest.approx(_hand_loss(reduction, soft_targets=soft_targets), rel=1e-5)


def test_soft_label_one_half_at_p_one_half_by_hand():
    # logit 0: p = 0.5, p_m = 0.45; prior 0.05: w+ = e^0.95 = 2.585710, w- = e^0.05 = 1.051271;
    # -log p = 0.693147, -log(1 - p_m) = -log 0.55 = 0.597837
    logits, y, prior = torch.zeros(1, 1), torch.full((1, 1), 0.5), [0.05]
    # expected: 0.5 * 2.585710 * 0.5 * 0.693147 + 0.5 * 1.051271 * 0.45^4 * 0.597837
    assert weighted_asl(logits, y, prior).item() == pytest.approx(0.460955, abs=2e-6)
    # reference: w = 1.818490, log term = -0.645492, 1 - p_t = 0.5 * 0.5 + 0.5 * 0.45 = 0.475,
    # gamma = 0.5 * 1 + 0.5 * 4 = 2.5: 1.818490 * 0.645492 * 0.475^2.5
    reference = weighted_asl(logits, y, prior, soft_targets="reference")
    assert reference.item() == pytest.approx(0.182531, abs=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_soft_target_modes_agree_on_hard_labels_with_gradients(reduction):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(16, 3, generator=g)).requires_grad_()
    targets = (torch.rand(16, 3, generator=g) < 0.3).float()
    targets[::5, 1] = NAN
    grads = []
    for mode in ("expected", "reference"):
        loss = weighted_asl(logits, targets, PRIOR, reduction=reduction, soft_targets=mode)
        grads.append((loss, torch.autograd.grad(loss, logits)[0]))
    (a, ga), (b, gb) = grads
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("soft_targets", ["expected", "reference"])
def test_module_matches_function_and_moves_prior(soft_targets):
    fn = WeightedASL(np.array(PRIOR), reduction="sum", soft_targets=soft_targets)
    assert "class_prior" in fn.state_dict()
    expected = weighted_asl(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(PRIOR), reduction="sum",
                            soft_targets=soft_targets)
    assert fn(torch.tensor(LOGITS), torch.tensor(TARGETS)).item() == pytest.approx(expected.item())


def _extreme_logits(dtype=torch.float32):
    return torch.tensor([[100.0, -100.0, 100.0], [-100.0, 100.0, -100.0]], dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("soft_targets", ["expected", "reference"])
def test_finite_under_bf16_autocast_with_extreme_logits(soft_targets):
    logits = _extreme_logits()
    targets = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, NAN]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_asl(logits @ torch.eye(3), targets, torch.tensor(PRIOR),  # bf16 matmul output
                            soft_targets=soft_targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("soft_targets", ["expected", "reference"])
def test_finite_for_float16_logits(soft_targets):
    logits = _extreme_logits(torch.float16)
    targets = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 1.0]])
    loss = weighted_asl(logits, targets, torch.tensor(PRIOR), soft_targets=soft_targets)
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


def test_bad_reduction_or_soft_target_mode_rejected():
    with pytest.raises(ValueError, match="reduction"):
        weighted_asl(torch.zeros(1, 3), torch.zeros(1, 3), PRIOR, reduction="batchmean")
    with pytest.raises(ValueError, match="soft_targets"):
        weighted_asl(torch.zeros(1, 3), torch.zeros(1, 3), PRIOR, soft_targets="linear")
    with pytest.raises(ValueError, match="soft_targets"):
        WeightedASL(PRIOR, soft_targets="linear")


def test_class_prior_is_nan_aware_and_counts_soft_labels():
    labels = np.array([[1.0, 0.0, NAN, NAN],
                       [0.0, NAN, 0.5, NAN],
                       [1.0, 1.0, 1.0, NAN],
                       [NAN, 0.0, 0.0, NAN]])
    np.testing.assert_allclose(class_prior(labels), [2 / 3, 1 / 3, 1.5 / 3, 0.0])
