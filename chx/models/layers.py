"""Small building blocks shared by both stages."""

from __future__ import annotations

import torch


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0, *,
              device: torch.device | str | None = None) -> torch.Tensor:
    """2-D sinusoidal positional encoding for an ``h x w`` grid -> [h*w, dim] float32.

    The first ``dim / 2`` channels encode the row (``sin`` then ``cos`` of the row index at
    ``dim / 4`` frequencies), the last ``dim / 2`` the column, so the encoding varies along rows AND
    columns. Tokens are in row-major order, matching ``x.flatten(2).transpose(1, 2)`` of a
    [B, C, H, W] map: token ``i * w + j`` is row ``i``, column ``j``.
    """
    if dim <= 0 or dim % 4:
        raise ValueError(f"sincos_2d needs an embedding dim divisible by 4 (sin/cos x rows/columns), "
                         f"got {dim}")
    if h <= 0 or w <= 0:
        raise ValueError(f"sincos_2d needs a non-empty grid, got {h} x {w}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    rows = torch.arange(h, dtype=torch.float32, device=device)[:, None] * omega      # [h, dim/4]
    cols = torch.arange(w, dtype=torch.float32, device=device)[:, None] * omega      # [w, dim/4]
    row_enc = torch.cat([rows.sin(), rows.cos()], dim=1)                               # [h, dim/2]
    col_enc = torch.cat([cols.sin(), cols.cos()], dim=1)                               # [w, dim/2]
    return torch.cat([row_enc[:, None, :].expand(h, w, dim // 2),
                      col_enc[None, :, :].expand(h, w, dim // 2)], dim=2).reshape(h * w, dim)
