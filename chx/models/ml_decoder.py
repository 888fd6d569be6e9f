"""ML-Decoder classification head (Ridnik et al., 2023), written for today's PyTorch.

Used by both stages: on a backbone's feature map (stage 1) and on the fusion encoder's tokens
(stage 2). With ``query_norm=True`` (every new model) the math is the original decoder layer's: the
fixed queries first go through ``q + dropout(q)`` and a LayerNorm, then cross-attention, residual,
LayerNorm, feed-forward, residual, LayerNorm. What differs from the original code, by design:

- the key padding mask is honoured (the original layer drops ``memory_key_padding_mask`` on the
  floor, so padded tokens are attended to);
- the "group FC" (one D -> 1 linear per class) is one batched einsum instead of a Python loop, and
  there is always one query per class (above 100 classes the original decodes 100 queries and
  gives each of them several classes);
- the layer is plain modules with batch_first attention, same math (the original's custom layer
  breaks inside ``nn.TransformerDecoder`` on PyTorch >= 2.1, which passes it ``tgt_is_causal``);
- an optional 2-D sinusoidal positional encoding (rows AND columns) is added to the projected
  tokens of a feature map; the original head has none (CheXFusion's reference code adds its own,
  without rows, to the backbone's map before the head).

``query_norm=False`` skips the query LayerNorm and its dropout: that is what chx models built
before the option existed computed, so their checkpoints (whose ``model_config`` lacks the key)
rebuild and reproduce their outputs exactly.
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
        dropout: dropout on the queries (with ``query_norm``), after attention, inside and after the
            feed-forward block.
        pos_enc: add a 2-D sinusoidal positional encoding to the tokens of a feature-map input.
            Token inputs never get one here: their producer adds its own.
        query_norm: the original layer's first step on the queries, ``norm(q + dropout(q))``
            (2 x D more parameters); False only to rebuild models made before it existed.

    Forward:
        ``x`` [B, C, H, W] (feature map) or [B, N, C] (tokens); optional ``key_padding_mask``
        [B, N] bool, True = ignore that token (token input only; every row must keep at least one
        token). Returns logits [B, K]; with ``return_attention=True`` also the cross-attention of
        each class query over the tokens, averaged over heads, ``[B, K, N]`` (each row sums to 1;
        N = H*W in row-major order for a map). The weights are computed only when asked, so the
        default path keeps PyTorch's fused attention.

    The K queries are a fixed random buffer [K, D] (not trained, but saved in the state dict so a
    reloaded model is identical). The decoder layer has no query self-attention; it is post-norm
    throughout, FFN D -> ffn_dim -> D with ReLU.
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 768, heads: int = 8,
                 ffn_dim: int = 2048, dropout: float = 0.1, pos_enc: bool = True,
                 query_norm: bool = True):
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
        if query_norm:
            self.query_dropout = nn.Dropout(dropout)
            self.query_norm = nn.LayerNorm(dim)
        else:
            self.query_dropout = self.query_norm = None
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

    def _tokens(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, C, H, W] or [B, N, C] -> projected tokens [B, N, D] (N = H*W for a map)."""
        if x.dim() == 4:                                             # [B, C, H, W] -> [B, HW, C]
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is for token input [B, N, C], not a feature map")
            h, w = x.shape[2:]
            tokens = torch.relu(self.embed(x.flatten(2).transpose(1, 2)))
            if self.pos_enc:
                tokens = tokens + sincos_2d(h, w, self.dim, device=tokens.device).to(tokens.dtype)
            return tokens
        if x.dim() == 3:
            return torch.relu(self.embed(x))
        raise ValueError(f"MLDecoder expects [B, C, H, W] or [B, N, C], got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokens(x, key_padding_mask)                                # [B, N, D]
        q = self.queries.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if self.query_norm is not None:
            # on the expanded queries, so that training draws a dropout mask per sample, as the
            # original does on its [K, B, D] copy
            q = self.query_norm(q + self.query_dropout(q))
        attended, attention = self.cross_attn(q, tokens, tokens, key_padding_mask=key_padding_mask,
                                              need_weights=return_attention,
                                              average_attn_weights=True)
        q = self.norm1(q + self.dropout1(attended))                               # [B, K, D]
        q = self.norm2(q + self.dropout2(self.ffn(q)))
        logits = torch.einsum("bkd,kd->bk", q, self.group_weight.to(q.dtype)) + self.group_bias.to(q.dtype)
        return (logits, attention) if return_attention else logits
