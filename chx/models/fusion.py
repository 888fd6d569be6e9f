"""CheXFusion: a transformer that fuses the cached feature maps of all views of ONE study.

Per view: feature map [C, H, W] -> trainable 3x3 stride-2 conv (C -> D) -> + 2-D sinusoidal
positional encoding -> + learnable segment embedding of the view's slot (-> + optional learnable
embedding of the view type: frontal, lateral, other). The tokens of a study's views are concatenated
and go through a transformer encoder (batch_first: attention runs over the tokens of one study, never
across the studies of a batch), with a key padding mask for empty view slots, then through the
stage-1 ML-Decoder head -> study logits [B, K].
"""

from __future__ import annotations

import torch
from torch import nn

from chx.data.views import N_VIEW_TYPES
from chx.models.layers import sincos_2d
from chx.models.ml_decoder import MLDecoder


class FusionModel(nn.Module):
    """Multi-view fusion over feature maps. Forward inputs:

    - ``features`` [B, V, C, H, W]: the views of each study (padding slots: anything, e.g. zeros);
    - ``view_mask`` [B, V] bool: True where a slot holds a real view;
    - ``view_types`` [B, V] long, :func:`chx.data.views.view_type` of each slot's view (0 frontal,
      1 lateral, 2 other; used with ``view_embedding``).

    ``query_norm`` is the ML-Decoder head's (see :class:`~chx.models.ml_decoder.MLDecoder`).

    Returns logits [B, K]; with ``return_attention=True`` also the head's cross-attention of each
    class query over all tokens of the study, averaged over heads, [B, K, V * h' * w']: slot v's
    tokens are ``[v*h'*w', (v+1)*h'*w')``, row-major over its projected map (h', w' =
    :meth:`token_grid` of the feature map's size). Padding slots get exactly 0.
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int | None = None, max_views: int = 4,
                 layers: int = 2, heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
                 pos_enc: bool = True, segment_embedding: bool = True, view_embedding: bool = False,
                 query_norm: bool = True):
        super().__init__()
        dim = dim or in_dim
        self.config = dict(in_dim=in_dim, num_classes=num_classes, dim=dim, max_views=max_views,
                           layers=layers, heads=heads, ffn_dim=ffn_dim, dropout=dropout,
                           pos_enc=pos_enc, segment_embedding=segment_embedding,
                           view_embedding=view_embedding, query_norm=query_norm)
        self.max_views = max_views
        self.pos_enc = pos_enc
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
        before the option existed: its model had no query norm."""
        return cls(**{"query_norm": False, **config})

    @staticmethod
    def token_grid(h: int, w: int) -> tuple[int, int]:
        """Token grid (h', w') of one view's [C, h, w] map after the 3x3 stride-2 projection."""
        return (h + 1) // 2, (w + 1) // 2

    def forward(self, features: torch.Tensor, view_mask: torch.Tensor,
                view_types: torch.Tensor | None = None, return_attention: bool = False):
        b, v, c, h, w = features.shape
        if v > self.max_views:
            raise ValueError(f"{v} view slots given; the model has {self.max_views}")
        x = self.proj(features.reshape(b * v, c, h, w))            # [B*V, D, h', w']
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
