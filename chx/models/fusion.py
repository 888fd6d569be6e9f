"""CheXFusion: a transformer that fuses the cached feature maps of all views of ONE study.

Per view: feature map [C, H, W] -> trainable 3x3 stride-2 conv (C -> D) -> + 2-D sinusoidal
positional encoding -> + learnable segment embedding of the view's slot (-> + optional learnable
embedding of the view type: frontal, lateral, other). The tokens of a study's views are concatenated
and go through a transformer encoder (batch_first: attention runs over the tokens of one study, never
across the studies of a batch), with a key padding mask for empty view slots, then through the
stage-1 ML-Decoder head -> study logits [B, K].

View experts (the paper's open question: do view-specific projections beat a shared one?) replace
the one conv by :class:`ViewExperts`: one conv per view type, hard-routed (``view_experts``), or a
mixture of ``experts`` convs whose gates are learned per view type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chx.data.views import N_VIEW_TYPES
from chx.models.layers import sincos_2d
from chx.models.ml_decoder import MLDecoder


class ViewExperts(nn.Module):
    """The per-view projection (3x3 stride-2 conv, C -> D) with one set of weights per view type.

    ``soft=False``: ``n`` must be :data:`~chx.data.views.N_VIEW_TYPES`; expert ``t`` projects the
    views of type ``t`` and no other (a lateral view never passes through the frontal expert).
    ``soft=True``: ``n`` experts mixed with gates ``softmax(gate[t])`` learned per view type
    (initialised uniform, so every type starts from the same projection). A conv is linear in its
    weights, so the gated sum of the experts' outputs is one conv with the gated sum of their
    weights: each view type present costs one conv, whatever ``n``.

    Forward: ``x`` [N, C, H, W], ``types`` [N] long -> [N, D, h', w'].
    """

    def __init__(self, in_dim: int, dim: int, n: int, soft: bool):
        super().__init__()
        if not soft and n != N_VIEW_TYPES:
            raise ValueError(f"hard-routed view experts: one per view type ({N_VIEW_TYPES}), not {n}")
        self.experts = nn.ModuleList(nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1)
                                     for _ in range(n))
        self.gate = nn.Parameter(torch.zeros(N_VIEW_TYPES, n)) if soft else None

    def _project(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.gate is None:
            return self.experts[t](x)
        g = self.gate[t].softmax(dim=0)
        weight = torch.einsum("e,eoikl->oikl", g, torch.stack([e.weight for e in self.experts]))
        bias = g @ torch.stack([e.bias for e in self.experts])
        return F.conv2d(x, weight, bias, stride=2, padding=1)

    def forward(self, x: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        out = None
        # Every type, also one absent from the batch (an empty projection, zero gradient): under
        # DDP each rank must use every parameter in every step.
        for t in range(N_VIEW_TYPES):
            idx = (types == t).nonzero().squeeze(1)
            y = self._project(x[idx], t)
            if out is None:      # dtype and size from the first projection (autocast decides them)
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out


class FusionModel(nn.Module):
    """Multi-view fusion over feature maps. Forward inputs:

    - ``features`` [B, V, C, H, W]: the views of each study (padding slots: anything, e.g. zeros);
    - ``view_mask`` [B, V] bool: True where a slot holds a real view;
    - ``view_types`` [B, V] long, :func:`chx.data.views.view_type` of each slot's view (0 frontal,
      1 lateral, 2 other; used with ``view_embedding`` and view experts).

    ``query_norm`` is the ML-Decoder head's (see :class:`~chx.models.ml_decoder.MLDecoder`).
    ``view_experts``: one projection per view type, hard-routed; ``experts`` E >= 2: a mixture of E
    projections gated by the view type (:class:`ViewExperts`; at most one of the two; default: one
    shared projection).

    Returns logits [B, K]; with ``return_attention=True`` also the head's cross-attention of each
    class query over all tokens of the study, averaged over heads, [B, K, V * h' * w']: slot v's
    tokens are ``[v*h'*w', (v+1)*h'*w')``, row-major over its projected map (h', w' =
    :meth:`token_grid` of the feature map's size). Padding slots get exactly 0.
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int | None = None, max_views: int = 4,
                 layers: int = 2, heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
                 pos_enc: bool = True, segment_embedding: bool = True, view_embedding: bool = False,
                 query_norm: bool = True, view_experts: bool = False, experts: int = 0):
        super().__init__()
        if view_experts and experts:
            raise ValueError("view_experts (hard routing) and experts (a gated mixture) exclude each other")
        if experts == 1 or experts < 0:
            raise ValueError(f"experts must be 0 (off) or >= 2, not {experts}")
        dim = dim or in_dim
        self.config = dict(in_dim=in_dim, num_classes=num_classes, dim=dim, max_views=max_views,
                           layers=layers, heads=heads, ffn_dim=ffn_dim, dropout=dropout,
                           pos_enc=pos_enc, segment_embedding=segment_embedding,
                           view_embedding=view_embedding, query_norm=query_norm)
        # Recorded only when on: a shared-projection model keeps the config older versions wrote,
        # so its runs still resume (the trainer compares configs) and from_config needs no default.
        if view_experts:
            self.config["view_experts"] = True
        if experts:
            self.config["experts"] = experts
        self.max_views = max_views
        self.pos_enc = pos_enc
        if view_experts or experts:
            self.proj = ViewExperts(in_dim, dim, experts or N_VIEW_TYPES, soft=bool(experts))
        else:
            self.proj = nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1)
        self.segment = nn.Parameter(torch.randn(max_views, dim) * 0.02) if segment_embedding else None
        self.view_type = nn.Parameter(torch.randn(N_VIEW_TYPES, dim) * 0.02) if view_embedding else None
        if layers > 0:
            layer = nn.TransformerEncoderLayer(dim, heads, ffn_dim, dropout, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            self.encoder = None
        self.head = MLDecoder(dim, num_classes, dim=dim, heads=heads, ffn_dim=ffn_dim,
                              dropout=dropout, pos_enc=False, query_norm=query_norm)

    @classmethod
    def from_config(cls, config: dict) -> "FusionModel":
        """Rebuild the architecture from ``config``. A config without ``query_norm`` was written
        before the option existed: its model had no query norm. Without ``view_experts`` /
        ``experts``: one shared projection (as every model before view experts)."""
        return cls(**{"query_norm": False, **config})

    @staticmethod
    def token_grid(h: int, w: int) -> tuple[int, int]:
        """Token grid (h', w') of one view's [C, h, w] map after the 3x3 stride-2 projection."""
        return (h + 1) // 2, (w + 1) // 2

    def project(self, maps: torch.Tensor, view_types: torch.Tensor | None = None) -> torch.Tensor:
        """Views' maps [N, C, H, W] (types [N], needed by view experts) -> [N, D, h', w']."""
        if isinstance(self.proj, ViewExperts):
            if view_types is None:
                raise ValueError("view experts need view_types")
            return self.proj(maps, view_types)
        return self.proj(maps)

    def forward(self, features: torch.Tensor, view_mask: torch.Tensor,
                view_types: torch.Tensor | None = None, return_attention: bool = False):
        b, v, c, h, w = features.shape
        if v > self.max_views:
            raise ValueError(f"{v} view slots given; the model has {self.max_views}")
        x = self.project(features.reshape(b * v, c, h, w),
                         None if view_types is None else view_types.reshape(b * v))  # [B*V, D, h', w']
        d, hh, ww = x.shape[1:]
        tokens = x.flatten(2).transpose(1, 2)                       # [B*V, h'w', D]
        if self.pos_enc:
            tokens = tokens + sincos_2d(hh, ww, d).to(tokens)
        tokens = tokens.reshape(b, v, hh * ww, d)
        if self.segment is not None:
            tokens = tokens + self.segment[:v].to(tokens)[None, :, None, :]
        if self.view_type is not None:
            if view_types is None:
                raise ValueError("view_embedding needs view_types")
            tokens = tokens + self.view_type.to(tokens)[view_types][:, :, None, :]
        tokens = tokens.reshape(b, v * hh * ww, d)
        padding = (~view_mask.bool())[:, :, None].expand(b, v, hh * ww).reshape(b, v * hh * ww)
        if self.encoder is not None:
            tokens = self.encoder(tokens, src_key_padding_mask=padding)
        return self.head(tokens, key_padding_mask=padding, return_attention=return_attention)
