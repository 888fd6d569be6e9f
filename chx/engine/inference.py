"""Inference: loading a stage-1 model, THE feature computation, and image / study probabilities.

:func:`feature_maps` is the only code that turns images into the maps the store holds: extraction
and ``chx predict`` both call it, so "predict equals the store path" holds by construction.
Flip TTA is defined once for each stage: the mean of the probabilities of the input and of its
horizontal flip (:func:`predict_images` on images, :func:`fusion_probs` on a study's maps).
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from chx.models import load_checkpoint, load_model
from chx.models.joint import stored_maps
from chx.workers import batches, worker_init

FEATURE_DTYPE = torch.float16   # the store's dtype of a map before any compact encoding


def load_backbone(checkpoint: Path) -> tuple[nn.Module, dict]:
    """A stage-1 model ready to predict (EMA weights when the run kept them) and its checkpoint."""
    ckpt = load_checkpoint(checkpoint, kind="backbone")
    return load_model(ckpt, kind="backbone"), ckpt


def images_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """THE move of a batch of images [B, C, H, W] to ``device``: channels_last on CUDA, the memory
    format the model is in there (:func:`model_to`)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


def model_to(model: nn.Module, device: torch.device) -> nn.Module:
    """THE move of a model to ``device``: channels_last on CUDA, as :func:`images_to` moves its inputs."""
    model.to(device)
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def feature_maps(model: nn.Module, images: torch.Tensor, pool: int = 1, flip: bool = False,
                 amp: torch.dtype | None = None) -> torch.Tensor:
    """Backbone maps as the store holds them: [B, 1, H, W] -> [B, C, h/pool, w/pool] float16.

    ``flip``: of the horizontally flipped images. ``pool`` > 1 average-pools K x K (in float32).
    ``amp``: the forward under autocast to this dtype (extraction's ``--precision``; None: float32)."""
    x = images_to(torch.flip(images, dims=[-1]) if flip else images, images.device)
    # amp None: the caller's precision (e.g. train-joint's validation under the training autocast)
    with torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        fmap = model.forward_features(x)
    # the one definition of pooling + float16 rounding, shared with joint training's forward
    return stored_maps(fmap, pool).to(FEATURE_DTYPE)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``--precision`` (auto, bf16, fp16, fp32) as an autocast dtype: mixed precision on GPU only (bf16
    autocast is ~10x slower on CPUs without native bf16); None: float32."""
    if torch.device(device).type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(amp: torch.dtype | None) -> str | None:
    """How a store records its maps' arithmetic: "bfloat16"/"float16" under autocast, None for float32
    (the key is then absent, as in stores made before it existed)."""
    return None if amp is None else str(amp).removeprefix("torch.")


def amp_of(name: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that repeats a store's recorded precision on ``device`` (CUDA only)."""
    if name is None or torch.device(device).type != "cuda":
        return None
    if name == "bfloat16" and not torch.cuda.is_bf16_supported():
        return torch.float16        # a GPU without bf16 (e.g. V100): the nearest it has
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def on_device(dataset: Dataset) -> bool:
    """Whether a dataset already holds its tensors on an accelerator (``--preload gpu``): its
    loader then takes no workers and no pinned memory."""
    resident = getattr(dataset, "resident", None)
    return resident is not None and resident.device.type != "cpu"


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, collate_fn=None):
    held = on_device(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0 if held else workers,
                      collate_fn=collate_fn, pin_memory=device.type == "cuda" and not held,
                      worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def predict_images(model: nn.Module, dataset: Dataset, *, batch_size: int = 16, workers: int = 2,
                   device: torch.device | str = "cpu", tta: bool = True, desc: str = "predict",
                   show_progress: bool = True) -> np.ndarray:
    """Stage-1 sigmoid probabilities [N, K] in dataset order; ``tta``: mean with the hflip's."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    with batches(_loader(dataset, batch_size, workers, device)) as loader:   # workers end on any exit
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False,
                          disable=None if show_progress else True):
            x = images_to(batch["image"], device)
            p = torch.sigmoid(model(x).float())
            if tta:
                p = 0.5 * (p + torch.sigmoid(model(torch.flip(x, dims=[-1])).float()))
            out.append(p.cpu())
    model.train(was_training)
    k = out[0].shape[1] if out else 0
    return torch.cat(out).numpy() if out else np.zeros((0, k), np.float32)


@torch.no_grad()
def fusion_probs(model: nn.Module, features: torch.Tensor, view_mask: torch.Tensor,
                 view_types: torch.Tensor, features_flip: torch.Tensor | None = None) -> torch.Tensor:
    """Study probabilities [B, K] from maps [B, V, C, H, W]; with ``features_flip`` (the flipped
    images' maps, same views) the mean of both: the fusion stage's flip TTA."""
    p = torch.sigmoid(model(features, view_mask, view_types).float())
    if features_flip is not None:
        p = 0.5 * (p + torch.sigmoid(model(features_flip, view_mask, view_types).float()))
    return p


@torch.no_grad()
def predict_studies(model: nn.Module, dataset: Dataset, flipped: Dataset | None = None, *,
                    batch_size: int = 16, device: torch.device | str = "cpu",
                    desc: str = "predict") -> np.ndarray:
    """Fusion probabilities [S, K] in dataset order (eval mode: deterministic views and order).

    ``flipped``: the same studies with the store's flipped maps (``StudyDataset(use_flip=True)``):
    flip TTA, as ``chx evaluate``, ``chx predict`` and validation during training use it."""
    from chx.data.study_dataset import collate_studies

    device = torch.device(device)
    was_training = model.training
    model.eval()
    loaders = [_loader(dataset, batch_size, 0, device, collate_studies)]
    if flipped is not None:
        loaders.append(_loader(flipped, batch_size, 0, device, collate_studies))
    out = []
    for pair in tqdm(zip(*loaders), total=len(loaders[0]), desc=desc, unit="batch", leave=False,
                     disable=None):
        b = pair[0]
        flip = pair[1]["features"].to(device) if flipped is not None else None
        out.append(fusion_probs(model, b["features"].to(device), b["view_mask"].to(device),
                                b["view_types"].to(device), flip).cpu())
    model.train(was_training)
    k = model.config["num_classes"]
    return torch.cat(out).numpy() if out else np.zeros((0, k), np.float32)


def store_study_probs(model: nn.Module, store: str, split: str, *, views: str = "all",
                      batch_size: int = 16, device: torch.device | str = "cpu", tta: bool = True,
                      preload: bool = False, desc: str | None = None):
    """Fusion probabilities of a store split and the StudyDataset they follow ((None, ds) if empty).

    Flip TTA when ``tta`` and the store holds flipped maps."""
    from chx.data.study_dataset import StudyDataset

    ds = StudyDataset(store, split, max_views=model.max_views, views=views, preload=preload)
    if len(ds) == 0:
        return None, ds
    flipped = (StudyDataset(store, split, max_views=model.max_views, views=views, use_flip=True,
                            preload=preload) if tta and ds.has_flip else None)
    return predict_studies(model, ds, flipped, batch_size=batch_size, device=device,
                           desc=desc or f"fusion on {split}"), ds
