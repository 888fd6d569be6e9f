"""Running a stage-1 model over images: probabilities per image, with optional hflip TTA."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from chx.errors import ChxError


def resolve_device(device: str = "auto") -> torch.device:
    """``--device`` -> a torch device: auto = cuda when a GPU is visible, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChxError(f"--device {device} was asked for but no GPU is visible; use --device cpu")
    return dev


def eval_weights(ckpt: dict) -> dict:
    """The weights to predict with: the EMA copy when the run kept one, else the model's own."""
    ema = ckpt.get("ema_state_dict")
    if ema:
        return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    return ckpt["state_dict"]


@torch.no_grad()
def predict_probs(model: nn.Module, dataset: Dataset, *, batch_size: int = 16, workers: int = 2,
                  device: torch.device | str = "cpu", tta: bool = True, desc: str = "predict",
                  show_progress: bool = True) -> np.ndarray:
    """Sigmoid probabilities [N, K] in dataset order. ``tta``: mean of the image and its hflip
    (of the probabilities)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    out = []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if show_progress else True):
        x = batch["image"].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        p = torch.sigmoid(model(x).float())
        if tta:
            p = 0.5 * (p + torch.sigmoid(model(torch.flip(x, dims=[-1])).float()))
        out.append(p.cpu())
    model.train(was_training)
    k = out[0].shape[1] if out else 0
    return torch.cat(out).numpy() if out else np.zeros((0, k), np.float32)
