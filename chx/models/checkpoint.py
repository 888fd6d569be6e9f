"""Checkpoint files: written atomically, read with a clear error when damaged.

A checkpoint is a dict with at least ``format``, ``kind`` ("backbone", "fusion" or "bundle"),
``model_config`` (enough to rebuild the model), ``state_dict`` and ``class_names``; training
checkpoints also hold ``optimizer``/``scheduler``/``scaler``/``step``/``rng`` (last.pt only: best.pt
keeps the weights, not the optimizer state). Everything in it is plain data and tensors, so it loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import zipfile
from pathlib import Path

import torch

from chx.atomic import atomic_path
from chx.errors import ChxError

FORMAT = "chx-checkpoint-1"
# A checkpoint's tensors are stored uncompressed in its zip: refuse one that claims to unpack to
# far more than its file size before torch.load allocates it (a zip bomb).
MAX_EXPANSION = 4.0


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=True) as tmp:
        with open(tmp, "wb") as f:
            try:
                torch.save({"format": FORMAT, **obj}, f)
            except RuntimeError as e:   # torch's zip writer reports a failed write (disk full) so
                raise OSError(errno.EIO, f"write failed ({e})") from None   # atomic_path: one line
    return path


def _check_not_a_bomb(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError):
        return   # not a zip: torch.load reports it
    size = path.stat().st_size
    if unpacked > MAX_EXPANSION * size + 2**20:
        raise ChxError(f"checkpoint {path} unpacks to {unpacked / 2**20:,.0f} MiB from a "
                       f"{size / 2**20:,.1f} MiB file; chx never writes such files: it is damaged "
                       f"or not a chx checkpoint")


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Load a chx checkpoint on the CPU; damaged or foreign files give one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ChxError(f"checkpoint {path} does not exist")
    _check_not_a_bomb(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, foreign objects
        raise ChxError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated, "
                       f"corrupt or not a chx checkpoint: use another file (e.g. best.pt/last.pt of the run)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ChxError(f"{path} is not a chx checkpoint (expected format {FORMAT})")
    if kind is not None and ckpt.get("kind") != kind:
        raise ChxError(f"{path} is a {ckpt.get('kind')} checkpoint; this command needs a {kind} checkpoint")
    ckpt.setdefault("source", str(path))
    return ckpt


def eval_weights(ckpt: dict) -> dict:
    """The weights to predict with: the EMA copy when the run kept one, else the model's own."""
    ema = ckpt.get("ema_state_dict")
    if ema:
        return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    return ckpt["state_dict"]


def weights_hash(state_dict: dict) -> str:
    """sha256 of the weights (names, shapes, bytes), independent of optimizer state or file."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
