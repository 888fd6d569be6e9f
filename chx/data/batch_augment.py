"""The stage-1 augmentation batched on the training device (``--augment-on device``).

:func:`chx.data.transforms.train_transform` augments one image at a time in a DataLoader worker; at
1,024 px that is CPU work the GPU then waits for. :class:`BatchAugment` does the same to a batch
[B, 1, S, S] of un-augmented images in [0, 1] on whatever device the batch is on, so a worker only
reads and resizes. Same distributions, by construction: each image's choices are drawn on the CPU
by :func:`chx.data.transforms.draw_augment` (the function the per-image transform draws through)
from a ``torch.Generator`` seeded with that image's sample seed (the samplers' function of seed,
epoch and position: exact resume needs no RNG state), then applied batched: the resized crop and the
flip as one bilinear ``grid_sample`` (the crop's source coordinates, clamped to the crop as
``interpolate`` clamps them), shift/scale/rotate as torchvision's affine grid (zero fill by its
sampled mask), the elastic warp as :func:`~chx.data.transforms.elastic_warp`, brightness/contrast
as broadcast ops, the blur as one grouped convolution; CLAHE, the noise field (made on the device
from its drawn seed) and the holes per image.

Outputs equal the per-image transform's up to float32 rounding of the sampling coordinates (see
tests/test_batch_augment.py); on a GPU the noise field comes from the GPU's generator (same
distribution, other values).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chx.data.transforms import (BLUR_KERNEL, NOISE_SIGMA, AugmentDraw, CoarseDropout, Preprocess, clahe,
                                 cut_holes, draw_augment, elastic_warp, noise_field)
from chx.options import AUGMENT_ON


def augment_on_device(choice: str, device: torch.device) -> bool:
    """``--augment-on``: whether the training batches are augmented on ``device``. auto: never (the
    workers): on an H200 with 16 cores the augmentation on the GPU ran in series with the training step
    and cost 29 % of stage-1 images/s (benchmarks/results/gpu-bench-2026-12-04.json), while one core
    of a 2-core VM reads and augments 32 cached images/s at 1,024 px (benchmarks/bench_image_path.py),
    so 16 cores supply ~5x the 103 images/s of the H200's step."""
    if choice not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {choice!r}")
    return choice == "device"


class BatchAugment(nn.Module):
    """``forward(images [B, 1, S, S] in [0, 1], seeds [B])`` -> augmented, clamped and normalised
    images (float32, on the images' device): what ``train_transform(pre, clahe, coarse_dropout)``
    makes of each image after ``torch.manual_seed(seed)``."""

    def __init__(self, pre: Preprocess, clahe: bool = False, coarse_dropout: float = 0.0):
        super().__init__()
        if coarse_dropout:
            CoarseDropout(coarse_dropout)          # its range check, now
        self.pre, self.clahe, self.coarse_dropout = pre, bool(clahe), float(coarse_dropout)

    def draws(self, seeds: Sequence[int] | torch.Tensor) -> list[AugmentDraw]:
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        return [draw_augment(self.pre.size, self.clahe, self.coarse_dropout,
                             generator=torch.Generator().manual_seed(int(s))) for s in seeds]

    def forward(self, images: torch.Tensor, seeds: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self.apply_draws(images, self.draws(seeds))

    def apply_draws(self, images: torch.Tensor, draws: list[AugmentDraw]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1 or len(draws) != images.shape[0]:
            raise ValueError(f"BatchAugment takes images [B, 1, S, S] and B draws, got "
                             f"{tuple(images.shape)} and {len(draws)}")
        with torch.autocast(images.device.type, enabled=False):
            x = images.float().contiguous()
            x = _per_image(x, draws, lambda d: d.clahe, lambda xi, d: clahe(xi, d.clahe))
            x = _crop_flip(x, draws)
            x = _subset(x, draws, lambda d: d.affine, _affine)
            x = _subset(x, draws, lambda d: d.elastic, lambda xs, ds: elastic_warp(
                xs, torch.stack([d.elastic for d in ds])))
            x = _subset(x, draws, lambda d: d.jitter, _jitter)
            x = _per_image(x, draws, lambda d: d.noise, lambda xi, d: (
                xi + noise_field(xi.shape, d.noise, xi.device) * NOISE_SIGMA).clamp(0, 1))
            x = _subset(x, draws, lambda d: d.blur, _blur)
            x = _per_image(x, draws, lambda d: d.holes, lambda xi, d: cut_holes(xi, d.holes))
            return (x.clamp(0, 1) - self.pre.mean) / self.pre.std

    def extra_repr(self) -> str:
        return f"size={self.pre.size}, clahe={self.clahe}, coarse_dropout={self.coarse_dropout}"


def _subset(x, draws, part, fn):
    """``fn(x[idx], draws of idx)`` written back for the images whose ``part(draw)`` is not None."""
    idx = [i for i, d in enumerate(draws) if part(d) is not None]
    if not idx:
        return x
    x = x.clone()
    x[idx] = fn(x[idx], [draws[i] for i in idx])
    return x


def _per_image(x, draws, part, fn):
    """``fn(x[i], draw)`` image by image, for those whose ``part(draw)`` is not None."""
    return _subset(x, draws, part, lambda xs, ds: torch.stack([fn(xi, d) for xi, d in zip(xs, ds)]))


def _crop_flip(x: torch.Tensor, draws: list[AugmentDraw]) -> torch.Tensor:
    """Resized crop (bilinear, to S) and horizontal flip as one ``grid_sample``: output pixel j of a
    crop of width w at ``left`` samples pixel ``left + clamp((j + 0.5) w / S - 0.5, 0, w - 1)``, as
    ``interpolate(align_corners=False)`` samples the cropped image (its antialias changes nothing
    when enlarging; crops are at most S)."""
    b, _, s, _ = x.shape
    top, left, h, w = (torch.tensor([d.crop[k] for d in draws], dtype=torch.float64)[:, None] for k in range(4))
    j = torch.arange(s, dtype=torch.float64)[None]

    def source(start, extent):             # [B, S] pixel coordinates -> normalised (align_corners=False)
        pixel = start + ((j + 0.5) * extent / s - 0.5).clamp(min=0).minimum(extent - 1)
        return (2 * pixel + 1) / s - 1

    gx, gy = source(left, w), source(top, h)
    flip = torch.tensor([d.flip for d in draws])[:, None]
    gx = torch.where(flip, gx.flip(-1), gx)
    grid = torch.stack([gx[:, None, :].expand(b, s, s), gy[:, :, None].expand(b, s, s)], dim=-1)
    return F.grid_sample(x, grid.to(x.device, torch.float32), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def _inverse_affine(angle: float, shift: tuple[int, int], scale: float) -> list[float]:
    """torchvision's inverse affine matrix (centre 0, no shear): output -> input coordinates."""
    rot = math.radians(angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    m = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    tx, ty = shift
    m[2] += m[0] * -tx + m[1] * -ty
    m[5] += m[3] * -tx + m[4] * -ty
    return m


def _affine(x: torch.Tensor, draws: list[AugmentDraw]) -> torch.Tensor:
    """Shift/scale/rotate as torchvision's ``affine`` (bilinear, fill 0): its grid (pixel-centred
    coordinates through the inverse matrix, normalised after), and the image times its sampled mask."""
    n, _, s, _ = x.shape
    theta = torch.tensor([_inverse_affine(*d.affine) for d in draws], dtype=torch.float32,
                         device=x.device).reshape(n, 2, 3)
    line = torch.linspace((1.0 - s) * 0.5, (s - 1.0) * 0.5, steps=s, device=x.device)
    base = torch.stack([line[None, :].expand(s, s), line[:, None].expand(s, s), torch.ones(s, s, device=x.device)],
                       dim=-1).reshape(1, s * s, 3)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * s, 0.5 * s], device=x.device)
    grid = base.expand(n, -1, -1).bmm(rescaled).reshape(n, s, s, 2)
    out = F.grid_sample(torch.cat([x, torch.ones_like(x)], dim=1), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out[:, :1] * out[:, 1:]


def _jitter(x: torch.Tensor, draws: list[AugmentDraw]) -> torch.Tensor:
    """Brightness (``x b``) and contrast (blend with the image mean by ``c``), each clamped to [0, 1],
    in each image's drawn order."""
    first, b, c = (torch.tensor([d.jitter[k] for d in draws], device=x.device)[:, None, None, None]
                   for k in range(3))
    b, c = b.float(), c.float()

    def brightness(t):
        return (t * b).clamp(0, 1)

    def contrast(t):
        return (t * c + (1 - c) * t.mean(dim=(-3, -2, -1), keepdim=True)).clamp(0, 1)

    x = torch.where(first, brightness(x), contrast(x))
    return torch.where(first, contrast(x), brightness(x))


def _blur(x: torch.Tensor, draws: list[AugmentDraw]) -> torch.Tensor:
    """Gaussian blur (7 x 7, reflect padding, torchvision's kernel) with each image's sigma, as one
    grouped convolution."""
    n, _, s, _ = x.shape
    sigma = torch.tensor([d.blur for d in draws], dtype=torch.float32, device=x.device)[:, None]
    lim = (BLUR_KERNEL - 1) / (2.0 * math.sqrt(2.0))
    k1 = torch.softmax(torch.linspace(-lim, lim, BLUR_KERNEL, device=x.device)[None].div(sigma).pow(2).neg(), -1)
    k2 = k1[:, :, None] * k1[:, None, :]                                  # [n, k, k]
    pad = BLUR_KERNEL // 2
    out = F.conv2d(F.pad(x.reshape(1, n, s, s), (pad, pad, pad, pad), mode="reflect"), k2[:, None], groups=n)
    return out.reshape(n, 1, s, s)
