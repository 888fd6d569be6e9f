"""Weighted asymmetric loss (weighted ASL) for multi-label, long-tailed, partly annotated labels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_prior(labels: np.ndarray) -> np.ndarray:
    """Per-class positive rate p_c = positives / annotated of a label matrix [N, K] -> [K] float64.

    NaN = not annotated (excluded from both counts); soft labels count by their value. A class with
    no annotated row gets 0. Compute it on the TRAINING labels only.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2:
        raise ValueError(f"class_prior expects a label matrix [N, K], got shape {labels.shape}")
    annotated = (~np.isnan(labels)).sum(axis=0)
    positives = np.nansum(labels, axis=0)
    return np.divide(positives, annotated, out=np.zeros(labels.shape[1]), where=annotated > 0)


SOFT_TARGETS = ("expected", "reference")


def _check_options(reduction: str, soft_targets: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if soft_targets not in SOFT_TARGETS:
        raise ValueError(f"soft_targets must be one of {', '.join(SOFT_TARGETS)}, got {soft_targets!r}")


def weighted_asl(logits: torch.Tensor, targets: torch.Tensor, class_prior: torch.Tensor | np.ndarray,
                 gamma_pos: float = 1.0, gamma_neg: float = 4.0, clip: float = 0.05,
                 reduction: str = "mean", soft_targets: str = "expected") -> torch.Tensor:
    """Class-weighted asymmetric loss (CheXFusion's "weighted ASL"), a scalar.

    Args:
        logits: [B, K] raw scores (any float dtype; the loss is computed in float32).
        targets: [B, K] in [0, 1]; soft values are pseudo labels (see ``soft_targets``);
            NaN = not annotated: such elements contribute nothing.
        class_prior: [K] p_c = n_c / N from the training labels (see :func:`class_prior`).
        gamma_pos, gamma_neg: focusing exponents of the positive / negative terms.
        clip: probability margin m on negatives, p_m = max(p - m, 0) (0 disables it).
        reduction: "mean" over the annotated elements (the CheXFusion reference code; default) or
            "sum" over them (the ASL paper). The choice scales the gradient, i.e. changes the
            effective learning rate by a factor of about B x K.
        soft_targets: how a label y strictly between 0 and 1 is read. On 0/1 labels both give the
            same loss.
            "expected" (default): the expected loss of a hard label drawn positive with probability
            y, linear in y: ``L = y L+ + (1 - y) L-``.
            "reference": the CheXFusion reference code's formula (its ``ASLwithClassWeight``): the
            weight, the log terms and the focusing exponent are each mixed by y, then multiplied.
            It sharpens pseudo labels: at prior 0.05 a label of 0.1 is fitted by p = 0.05, one of
            0.9 by p -> 1 (see benchmarks/soft_labels.py). The paper's self-training gain was
            obtained with it.

    With p = sigmoid(logit), w+ = exp(1 - p_c), w- = exp(p_c), p_m = max(p - m, 0):
        L+ = -w+ (1 - p)^gamma_pos log(p),   L- = -w- p_m^gamma_neg log(1 - p_m)
        "reference": L = -w_y [y log(p) + (1 - y) log(1 - p_m)] q^gamma_y  with
            w_y = y w+ + (1 - y) w-,  gamma_y = y gamma_pos + (1 - y) gamma_neg,
            q = 1 - p_t = y (1 - p) + (1 - y) p_m.
    log(p) is a log-sigmoid and log(1 - p_m) = log(min(sigmoid(-logit) + m, 1)), so the loss stays
    finite for any logit, also under fp16/bf16 autocast (the reference clamps p at 1e-8 instead). A
    batch without annotated elements gives 0 (with a gradient), not NaN.
    """
    _check_options(reduction, soft_targets)
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both "
                         f"be [B, K]")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.float()
        t = targets.to(device=x.device, dtype=torch.float32)
        prior = torch.as_tensor(class_prior, dtype=torch.float32, device=x.device)
        if prior.shape != (x.shape[1],):
            raise ValueError(f"class_prior has shape {tuple(prior.shape)}, expected ({x.shape[1]},)")
        annotated = ~torch.isnan(t)
        y = torch.where(annotated, t, torch.zeros_like(t))
        w_pos = torch.exp(1.0 - prior)
        w_neg = torch.exp(prior)

        p, one_minus_p = torch.sigmoid(x), torch.sigmoid(-x)   # 1 - p without cancellation
        log_p = F.logsigmoid(x)
        if clip > 0:
            p_m = (p - clip).clamp(min=0.0)
            log_one_minus = torch.log((one_minus_p + clip).clamp(max=1.0))  # >= log(clip)
        else:
            p_m = p
            log_one_minus = F.logsigmoid(-x)
        if soft_targets == "expected":
            pos = w_pos * one_minus_p.pow(gamma_pos) * log_p
            neg = w_neg * p_m.pow(gamma_neg) * log_one_minus
            loss = -(y * pos + (1.0 - y) * neg)
        else:
            weight = y * w_pos + (1.0 - y) * w_neg
            log_term = y * log_p + (1.0 - y) * log_one_minus
            one_minus_pt = y * one_minus_p + (1.0 - y) * p_m
            gamma = y * gamma_pos + (1.0 - y) * gamma_neg
            loss = -weight * log_term * one_minus_pt.pow(gamma)
        total = (loss * annotated).sum()
        if reduction == "sum":
            return total
        return total / annotated.sum().clamp(min=1)


class WeightedASL(nn.Module):
    """:func:`weighted_asl` with the class prior [K] held as a buffer (moves with ``.to(device)``)."""

    def __init__(self, class_prior: torch.Tensor | np.ndarray, gamma_pos: float = 1.0,
                 gamma_neg: float = 4.0, clip: float = 0.05, reduction: str = "mean",
                 soft_targets: str = "expected"):
        super().__init__()
        _check_options(reduction, soft_targets)
        prior = torch.as_tensor(class_prior, dtype=torch.float32).clone()
        self.register_buffer("class_prior", prior)
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip
        self.reduction = reduction
        self.soft_targets = soft_targets

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return weighted_asl(logits, targets, self.class_prior, self.gamma_pos, self.gamma_neg,
                            self.clip, self.reduction, self.soft_targets)

    def extra_repr(self) -> str:
        return (f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, "
                f"reduction={self.reduction!r}, soft_targets={self.soft_targets!r}")
