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


def weighted_asl(logits: torch.Tensor, targets: torch.Tensor, class_prior: torch.Tensor | np.ndarray,
                 gamma_pos: float = 1.0, gamma_neg: float = 4.0, clip: float = 0.05,
                 reduction: str = "mean") -> torch.Tensor:
    """Class-weighted asymmetric loss (CheXFusion's "weighted ASL"), a scalar.

    Args:
        logits: [B, K] raw scores (any float dtype; the loss is computed in float32).
        targets: [B, K] in [0, 1]; soft values (pseudo labels) mix the positive and negative terms;
            NaN = not annotated: such elements contribute nothing.
        class_prior: [K] p_c = n_c / N from the training labels (see :func:`class_prior`).
        gamma_pos, gamma_neg: focusing exponents of the positive / negative terms.
        clip: probability margin m on negatives, p_m = max(p - m, 0) (0 disables it).
        reduction: "mean" over the annotated elements (the CheXFusion reference code; default) or
            "sum" over them (the ASL paper). The choice scales the gradient, i.e. changes the
            effective learning rate by a factor of about B x K.

    With p = sigmoid(logit), w+ = exp(1 - p_c), w- = exp(p_c):
        L = -[ y w+ (1 - p)^gamma_pos log(p) + (1 - y) w- p_m^gamma_neg log(1 - p_m) ].
    log(p) is a log-sigmoid and log(1 - p_m) = log(min(sigmoid(-logit) + m, 1)), so the loss stays
    finite for any logit, also under fp16/bf16 autocast. A batch without annotated elements gives 0
    (with a gradient), not NaN.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
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

        p = torch.sigmoid(x)
        pos = w_pos * (1.0 - p).pow(gamma_pos) * F.logsigmoid(x)
        if clip > 0:
            p_m = (p - clip).clamp(min=0.0)
            log_one_minus = torch.log((torch.sigmoid(-x) + clip).clamp(max=1.0))  # >= log(clip)
        else:
            p_m = p
            log_one_minus = F.logsigmoid(-x)
        neg = w_neg * p_m.pow(gamma_neg) * log_one_minus
        loss = -(y * pos + (1.0 - y) * neg) * annotated
        total = loss.sum()
        if reduction == "sum":
            return total
        return total / annotated.sum().clamp(min=1)


class WeightedASL(nn.Module):
    """:func:`weighted_asl` with the class prior [K] held as a buffer (moves with ``.to(device)``)."""

    def __init__(self, class_prior: torch.Tensor | np.ndarray, gamma_pos: float = 1.0,
                 gamma_neg: float = 4.0, clip: float = 0.05, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        prior = torch.as_tensor(class_prior, dtype=torch.float32).clone()
        self.register_buffer("class_prior", prior)
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return weighted_asl(logits, targets, self.class_prior, self.gamma_pos, self.gamma_neg,
                            self.clip, self.reduction)

    def extra_repr(self) -> str:
        return (f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, "
                f"reduction={self.reduction!r}")
