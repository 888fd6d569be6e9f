"""Checkpoint files: written atomically, read with a clear error when damaged.

A checkpoint is a dict with at least ``format``, ``kind`` ("backbone" or "fusion"), ``model_config``
(enough to rebuild the model), ``state_dict``, ``class_names`` and, for training state,
``optimizer``/``scheduler``/``scaler``/``step``/``rng``. Everything in it is plain data and tensors,
so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from chx.atomic import atomic_path
from chx.errors import ChxError

FORMAT = "chx-checkpoint-1"


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=True) as tmp:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **obj}, f)
    return path


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Load a chx checkpoint on the CPU; damaged or foreign files give one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ChxError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, foreign objects
        raise ChxError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated, "
                       f"corrupt or not a chx checkpoint: use another file (e.g. best.pt/last.pt of the run)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ChxError(f"{path} is not a chx checkpoint (expected format {FORMAT})")
    if kind is not None and ckpt.get("kind") != kind:
        raise ChxError(f"{path} is a {ckpt.get('kind')} checkpoint; this command needs a {kind} checkpoint")
    return ckpt
