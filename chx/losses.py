"""Multi-label losses for long-tailed, partly annotated labels, chosen by name (``--loss``):

- ``wasl`` (default): CheXFusion's weighted asymmetric loss, :func:`weighted_asl`;
- ``asl``: the asymmetric loss without the class weights (Ridnik et al., ICCV 2021);
- ``db``: the distribution-balanced loss (Wu et al., ECCV 2020), :func:`distribution_balanced`;
- ``bce``: plain binary cross-entropy.

Each is a module ``loss(logits [B, K], targets [B, K]) -> scalar`` built by :func:`make_loss` from
the training labels' class prior; NaN targets (not annotated) contribute nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chx.errors import ChxError


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


def _inputs(logits: torch.Tensor, targets: torch.Tensor, class_prior):
    """Every loss's inputs in float32 (call inside autocast(enabled=False)): logits, the prior
    ([K], or None), the annotated mask (targets not NaN) and the targets with NaN as 0."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both "
                         f"be [B, K]")
    x = logits.float()
    t = targets.to(device=x.device, dtype=torch.float32)
    prior = None
    if class_prior is not None:
        prior = torch.as_tensor(class_prior, dtype=torch.float32, device=x.device)
        if prior.shape != (x.shape[1],):
            raise ValueError(f"class_prior has shape {tuple(prior.shape)}, expected ({x.shape[1]},)")
    annotated = ~torch.isnan(t)
    return x, prior, annotated, torch.where(annotated, t, torch.zeros_like(t))


def weighted_asl(logits: torch.Tensor, targets: torch.Tensor, class_prior: torch.Tensor | np.ndarray,
                 gamma_pos: float = 1.0, gamma_neg: float = 4.0, clip: float = 0.05,
                 reduction: str = "mean", soft_targets: str = "expected",
                 class_weights: bool = True) -> torch.Tensor:
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
        class_weights: False gives the plain ASL (w+ = w- = 1; ``--loss asl``).

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
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x, prior, annotated, y = _inputs(logits, targets, class_prior)
        if class_weights:
            w_pos, w_neg = torch.exp(1.0 - prior), torch.exp(prior)
        else:
            w_pos = w_neg = torch.ones_like(prior)

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
                 soft_targets: str = "expected", class_weights: bool = True):
        super().__init__()
        _check_options(reduction, soft_targets)
        prior = torch.as_tensor(class_prior, dtype=torch.float32).clone()
        self.register_buffer("class_prior", prior)
        self.class_weights = class_weights
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip
        self.reduction = reduction
        self.soft_targets = soft_targets

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return weighted_asl(logits, targets, self.class_prior, self.gamma_pos, self.gamma_neg,
                            self.clip, self.reduction, self.soft_targets, self.class_weights)

    def extra_repr(self) -> str:
        return (f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, "
                f"reduction={self.reduction!r}, soft_targets={self.soft_targets!r}, "
                f"class_weights={self.class_weights}")


def distribution_balanced(logits: torch.Tensor, targets: torch.Tensor,
                          class_prior: torch.Tensor | np.ndarray, alpha: float = 0.1, beta: float = 10.0,
                          mu: float = 0.3, kappa: float = 0.05, neg_scale: float = 2.0,
                          gamma: float = 2.0, scale: float = 2.0) -> torch.Tensor:
    """Distribution-balanced loss (Wu et al., ECCV 2020), as the authors' ``ResampleLoss`` computes it
    with ``reweight_func='rebalance'``, focal on and ``logit_reg`` on; a scalar, the mean over the
    annotated elements.

    With p_c the class prior (the training positive rate, which stands for n_c / N: N cancels), for
    sample b and class i:

    - re-balanced weight: ``r_bi = (1 / p_i) / sum_{c: y_bc = 1} (1 / p_c)`` (the class-level over the
      instance-level sampling rate), smoothed ``r^_bi = alpha + sigmoid(beta (r_bi - mu))``, for
      positives and negatives alike. A sample without positives has r = inf: r^ = alpha + 1.
    - negative-tolerant regularisation: the logit is shifted by the class-specific bias
      ``b_i = -(kappa / lambda) log(1 / p_i - 1)`` (z' = z + b_i) and negatives are scaled by
      ``lambda`` (``neg_scale``):
        L+ = -(1 - q+)^gamma log(q+),              q+ = sigmoid(z')
        L- = -(1 / lambda) q-^gamma log(1 - q-),   q- = sigmoid(lambda z')
    - ``L = scale * r^ * [y L+ + (1 - y) L-]`` (``scale`` is their focal ``balance_param``).

    Defaults: alpha 0.1, beta 10, mu 0.3, kappa 0.05, lambda 2, gamma 2, scale 2 (the paper's text;
    the authors' COCO config has mu 0.2 / lambda 2, their VOC config mu 0.3 / lambda 5). As in their
    code, the bias is kappa/lambda log(1/p - 1) inside the positive term (the paper writes kappa
    log(1/p - 1)), and it shapes the loss only: the model's own logits are what it predicts with.

    Soft labels (pseudo labels) enter linearly, as the expected loss of a hard label drawn with
    probability y; y also counts fractionally in the instance-level rate. p is clamped to
    [1e-6, 1 - 1e-6] (a class without a training positive gets a finite bias).
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x, prior, annotated, y = _inputs(logits, targets, class_prior)
        p = prior.clamp(1e-6, 1.0 - 1e-6)
        with torch.no_grad():
            freq_inv = 1.0 / p                                                   # [K]
            repeat = (y * freq_inv).sum(dim=1, keepdim=True)                     # [B, 1]
            r = torch.where(repeat > 0, freq_inv / repeat.clamp(min=1e-30),
                            torch.full_like(repeat, float("inf")))
            weight = alpha + torch.sigmoid(beta * (r - mu))                      # [B, K]
        z = x - (kappa / neg_scale) * torch.log(1.0 / p - 1.0)
        pos = (1.0 - torch.sigmoid(z)).pow(gamma) * F.softplus(-z)
        zn = neg_scale * z
        neg = torch.sigmoid(zn).pow(gamma) * F.softplus(zn) / neg_scale
        loss = scale * weight * (y * pos + (1.0 - y) * neg)
        return (loss * annotated).sum() / annotated.sum().clamp(min=1)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, the mean over the annotated (non-NaN) elements."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x, _, annotated, y = _inputs(logits, targets, None)
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        return (loss * annotated).sum() / annotated.sum().clamp(min=1)


class DistributionBalancedLoss(nn.Module):
    """:func:`distribution_balanced` with the class prior [K] held as a buffer."""

    def __init__(self, class_prior: torch.Tensor | np.ndarray, **options):
        super().__init__()
        self.register_buffer("class_prior", torch.as_tensor(class_prior, dtype=torch.float32).clone())
        self.options = options

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return distribution_balanced(logits, targets, self.class_prior, **self.options)


class BCELoss(nn.Module):
    """:func:`masked_bce` as a module."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_bce(logits, targets)


LOSSES = ("wasl", "asl", "db", "bce")
DEFAULT_LOSS = "wasl"


def make_loss(name: str, class_prior: torch.Tensor | np.ndarray, soft_targets: str = "expected",
              **options) -> nn.Module:
    """The loss ``name`` (:data:`LOSSES`) on the training labels' class prior [K]. ``soft_targets``
    "reference" is the weighted ASL's formula: the other losses refuse it (they read a soft label as
    the expected loss)."""
    if name not in LOSSES:
        raise ChxError(f"--loss {name!r} is not one of {', '.join(LOSSES)}")
    if name in ("wasl", "asl"):
        return WeightedASL(class_prior, soft_targets=soft_targets, class_weights=name == "wasl",
                           **options)
    if soft_targets != "expected":
        raise ChxError(f"--soft-targets {soft_targets} is a formula of the (weighted) ASL; --loss {name} "
                       f"reads soft labels as the expected loss: drop --soft-targets or use --loss wasl")
    if name == "db":
        return DistributionBalancedLoss(class_prior, **options)
    return BCELoss(**options)
