"""ML-Decoder classification head (Ridnik et al., 2023), written for today's PyTorch.

Used by both stages: on a backbone's feature map (stage 1) and on the fusion encoder's tokens
(stage 2). Differences from the original code, same math: the decoder layer uses a batch_first
``nn.MultiheadAttention`` (the original breaks on PyTorch >= 2.1), and the "group FC" is one batched
einsum instead of a Python loop over classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from chx.models.layers import sincos_2d


class MLDecoder(nn.Module):
    """Class queries cross-attend to spatial tokens; one linear D -> 1 per class gives the logits.

    Args:
        in_dim: channels C of the input map / tokens.
        num_classes: K, one query (and one output logit) per class.
        dim: D, the decoder width. With ``pos_enc`` it must be divisible by 4.
        heads: attention heads (D must be divisible by it).
        ffn_dim: hidden width of the feed-forward block.
        dropout: dropout after attention, inside and after the feed-forward block.
        pos_enc: add a 2-D sinusoidal positional encoding to the tokens of a feature-map input.
            Token inputs never get one here: their producer adds its own.

    Forward:
        ``x`` [B, C, H, W] (feature map) or [B, N, C] (tokens); optional ``key_padding_mask``
        [B, N] bool, True = ignore that token (token input only; every row must keep at least one
        token). Returns logits [B, K].

    The K queries are a fixed random buffer [K, D] (not trained, but saved in the state dict so a
    reloaded model is identical). The decoder layer has no query self-attention: cross-attention,
    dropout, residual, LayerNorm (post-norm); FFN D -> ffn_dim -> D with ReLU and dropout,
    residual, LayerNorm.
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 768, heads: int = 8,
                 ffn_dim: int = 2048, dropout: float = 0.1, pos_enc: bool = True):
        super().__init__()
        if pos_enc and dim % 4:
            raise ValueError(f"MLDecoder with pos_enc needs dim divisible by 4, got {dim}")
        if dim % heads:
            raise ValueError(f"MLDecoder dim {dim} is not divisible by heads {heads}")
        self.num_classes = num_classes
        self.dim = dim
        self.pos_enc = pos_enc
        self.embed = nn.Linear(in_dim, dim)
        self.register_buffer("queries", torch.randn(num_classes, dim))
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        # group FC: class k's logit is <h_k, weight[k]> + bias[k]
        bound = 1.0 / math.sqrt(dim)
        self.group_weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.group_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 4:                                             # [B, C, H, W] -> [B, HW, C]
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is for token input [B, N, C], not a feature map")
            h, w = x.shape[2:]
            tokens = torch.relu(self.embed(x.flatten(2).transpose(1, 2)))       # [B, HW, D]
            if self.pos_enc:
                tokens = tokens + sincos_2d(h, w, self.dim, device=tokens.device).to(tokens.dtype)
        elif x.dim() == 3:
            tokens = torch.relu(self.embed(x))                                   # [B, N, D]
        else:
            raise ValueError(f"MLDecoder expects [B, C, H, W] or [B, N, C], got shape {tuple(x.shape)}")
        queries = self.queries.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        attended, _ = self.cross_attn(queries, tokens, tokens, key_padding_mask=key_padding_mask,
                                      need_weights=False)
        q = self.norm1(queries + self.dropout1(attended))                         # [B, K, D]
        q = self.norm2(q + self.dropout2(self.ffn(q)))
        return torch.einsum("bkd,kd->bk", q, self.group_weight.to(q.dtype)) + self.group_bias.to(q.dtype)
