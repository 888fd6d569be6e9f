"""Stage-1 classification heads, chosen by name (``--head``): a feature map [B, C, h, w] -> logits [B, K].

- ``ml-decoder`` (default, CheXFusion's): :class:`~chx.models.ml_decoder.MLDecoder`.
- ``csra``: class-specific residual attention (Zhu & Wu, ICCV 2021, "Residual Attention: A Simple
  but Effective Method for Multi-Label Recognition"), :class:`CSRAHead`.
- ``linear``: global average pooling + one linear layer, :class:`LinearHead`.

Every head takes ``(fmap, return_attention=False)``; with ``return_attention`` it also gives a map
per class over the h*w locations (row-major, each row summing to 1) or, where it has none (linear),
refuses with one line that names the alternative (Grad-CAM works with every head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chx.errors import ChxError

HEADS = ("ml-decoder", "csra", "linear")
DEFAULT_HEAD = "ml-decoder"

# The authors' temperatures of the multi-head variant (their ``MHA.temp_settings``); None is their
# T = 99: max pooling over the locations.
CSRA_TEMPERATURES = {1: None, 2: (1.0, None), 4: (1.0, 2.0, 4.0, None),
                     6: (1.0, 2.0, 3.0, 4.0, 5.0, None), 8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, None)}


def check_head(name: str, csra_heads: int = 1, csra_lambda: float = 0.1,
               csra_temperature: float = 1.0) -> None:
    """One line for a head option that cannot be built."""
    if name not in HEADS:
        raise ChxError(f"--head {name!r} is not one of {', '.join(HEADS)}")
    if name == "csra":
        if csra_heads not in CSRA_TEMPERATURES:
            raise ChxError(f"--csra-heads {csra_heads}: use one of "
                           f"{', '.join(map(str, CSRA_TEMPERATURES))} (the paper's temperature sets)")
        if not csra_lambda >= 0:
            raise ChxError(f"--csra-lambda {csra_lambda}: must be >= 0")
        if not (csra_temperature > 0 and csra_temperature < float("inf")):
            raise ChxError(f"CSRA temperature {csra_temperature}: must be a positive finite number")


class CSRAHead(nn.Module):
    """Class-specific residual attention.

    Per head: a 1x1 classifier m_k (no bias) scores each location j, normalised by the classifier's
    norm as the authors' code does: ``s_kj = <m_k, x_j> / ||m_k||``. Then

        logit_k = mean_j s_kj  +  lambda * sum_j softmax_j(T s_kj) s_kj

    the class-agnostic average pooling plus lambda times the class-specific attention pooling
    (T -> infinity: max pooling). ``heads`` > 1 sums heads with the paper's temperature sets
    (:data:`CSRA_TEMPERATURES`, each with its own classifier); ``temperature`` is the single
    head's T. The attention map of a class (``return_attention``) is the softmax over the locations,
    averaged over the heads (a max-pooling head contributes the one-hot of its arg max).
    """

    def __init__(self, in_dim: int, num_classes: int, heads: int = 1, lam: float = 0.1,
                 temperature: float = 1.0):
        super().__init__()
        check_head("csra", heads, lam, temperature)
        temps = CSRA_TEMPERATURES[heads]
        self.temperatures = [float(temperature)] if temps is None else list(temps)
        self.lam = float(lam)
        self.classifiers = nn.ModuleList(nn.Conv2d(in_dim, num_classes, 1, bias=False)
                                         for _ in self.temperatures)

    def forward(self, fmap: torch.Tensor, return_attention: bool = False):
        logits, attention = 0.0, 0.0
        for conv, t in zip(self.classifiers, self.temperatures):
            norm = conv.weight.flatten(1).norm(dim=1)                       # [K]
            score = conv(fmap).flatten(2) / norm[None, :, None].to(fmap.dtype)  # [B, K, h*w]
            if t is None:
                att_logit, idx = score.max(dim=2)
                weights = F.one_hot(idx, score.shape[2]).to(score.dtype) if return_attention else None
            else:
                weights = torch.softmax(score * t, dim=2)
                att_logit = (score * weights).sum(dim=2)
            logits = logits + score.mean(dim=2) + self.lam * att_logit
            if return_attention:
                attention = attention + weights / len(self.temperatures)
        return (logits, attention) if return_attention else logits

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperatures={self.temperatures}"


class LinearHead(nn.Module):
    """Global average pooling over the map, then one linear layer C -> K (with bias)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, fmap: torch.Tensor, return_attention: bool = False):
        if return_attention:
            raise ChxError("this stage-1 model has a linear head, which has no attention maps: "
                           "explain it with --method grad-cam")
        return self.fc(fmap.mean(dim=(2, 3)))
