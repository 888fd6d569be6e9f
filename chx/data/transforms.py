"""Preprocessing (travels inside checkpoints) and the stage-1 augmentations.

Images arrive from :func:`chx.data.images.load_image` as float32 tensors [1, S, S] in [0, 1],
already resized (letterbox or squash) to ``Preprocess.size``. The models take ONE channel (timm
``in_chans=1``), normalised with a single mean/std (the channel mean of ImageNet's mean/std).

- :func:`eval_transform`: normalise only (the resize happened when loading).
- :func:`train_transform`: the augmentations of METHOD.md stage 1 (torchvision.transforms.v2 plus a
  fast smooth elastic warp), then clamp to [0, 1] and normalise. All randomness comes from torch's
  global RNG, so ``torch.manual_seed`` makes it reproducible.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from chx.data.images import RESIZE_MODES
from chx.errors import ChxError

__all__ = ["Preprocess", "train_transform", "eval_transform", "Normalize", "Clamp",
           "RandomElastic"]


@dataclass(frozen=True)
class Preprocess:
    """How images become model input: resize to ``size`` x ``size`` (``letterbox`` keeps the aspect
    ratio and pads with black, ``squash`` stretches), one channel, ``(x - mean) / std``.

    Stored in every checkpoint (``to_dict``/``from_dict``) so that inference preprocesses exactly as
    training did.
    """

    size: int
    mode: str = "letterbox"
    mean: float = 0.449
    std: float = 0.226

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, numbers.Integral) or self.size < 1:
            raise ChxError(f"preprocess: size must be a positive integer, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        if self.mode not in RESIZE_MODES:
            raise ChxError(f"preprocess: resize mode {self.mode!r} is not one of "
                           f"{', '.join(RESIZE_MODES)}")
        if not math.isfinite(float(self.mean)):
            raise ChxError(f"preprocess: mean must be a finite number, got {self.mean!r}")
        if not (math.isfinite(float(self.std)) and float(self.std) > 0):
            raise ChxError(f"preprocess: std must be a positive number, got {self.std!r}")
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """Inverse of :meth:`to_dict`. Unknown keys are an error (a checkpoint from a newer chx
        may preprocess differently; silently ignoring that gives wrong predictions)."""
        if not isinstance(d, dict):
            raise ChxError(f"preprocess settings must be a mapping, got {type(d).__name__}; "
                           f"the checkpoint is damaged or not a chx checkpoint")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ChxError(f"preprocess settings have unknown keys {unknown} (made by a newer chx?); "
                           f"upgrade chx to use this checkpoint")
        if "size" not in d:
            raise ChxError("preprocess settings lack 'size'; the checkpoint is damaged or not a chx "
                           "checkpoint")
        return cls(**d)


class Normalize(nn.Module):
    """``(x - mean) / std`` with the checkpoint's mean/std, as a picklable module (DataLoader workers)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class Clamp(nn.Module):
    def __init__(self, lo: float = 0.0, hi: float = 1.0):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)


class RandomElastic(nn.Module):
    """Smooth random warp ("occasional distortion"): a random displacement on a coarse
    ``grid`` x ``grid`` lattice, upsampled bicubically to the image and applied with one
    ``grid_sample`` (bilinear, zero fill).

    ``magnitude`` is the largest displacement as a fraction of the image side, so the distortion
    looks the same at every input size. It replaces torchvision's ElasticTransform, whose Gaussian
    smoothing of a full-resolution field costs ~45 ms at 256 px and ~0.8 s at 1024 px on one core.
    """

    def __init__(self, magnitude: float = 0.02, grid: int = 5):
        super().__init__()
        self.magnitude, self.grid = float(magnitude), int(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        lead = x.shape[:-2]
        # Normalised coordinates span 2 units per side: a fraction f of the side is 2 f.
        disp = (torch.rand(1, 2, self.grid, self.grid) * 2 - 1) * (2 * self.magnitude)
        # Bicubic to at most 64 x 64 (smooth), then bilinear to full size: bicubic straight to
        # 1024 x 1024 costs ~25 ms, this ~4 ms, and the field is the same to the eye.
        disp = F.interpolate(disp, size=(min(h, 64), min(w, 64)), mode="bicubic", align_corners=True)
        disp = F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=True)
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w)
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # [2, h, w] as (x, y)
        grid = (base[None] + disp).permute(0, 2, 3, 1).to(x.dtype)
        flat = x.reshape(1, -1, h, w)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.reshape(*lead, h, w)

    def extra_repr(self) -> str:
        return f"magnitude={self.magnitude}, grid={self.grid}"


def train_transform(pre: Preprocess) -> v2.Compose:
    """Stage-1 training augmentation for float tensors [1, S, S] in [0, 1] (S = ``pre.size``).

    In order: random resized crop (scale 0.9-1, ratio 0.9-1.1, back to S); horizontal flip
    (p 0.5); shift/scale/rotate (p 0.5: translate 6 %, scale 0.9-1.1, rotate 10 deg, black fill);
    smooth elastic distortion (p 0.2); brightness/contrast (p 0.5, factors 0.8-1.2); Gaussian
    noise (sigma 0.02) or Gaussian blur (sigma 0.1-1.5 px) (p 0.2); clamp to [0, 1]; normalise.
    """
    s = pre.size
    bilinear = v2.InterpolationMode.BILINEAR
    return v2.Compose([
        v2.RandomResizedCrop(s, scale=(0.9, 1.0), ratio=(0.9, 1.1), interpolation=bilinear,
                             antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1),
                                        interpolation=bilinear, fill=0)], p=0.5),
        v2.RandomApply([RandomElastic(magnitude=0.02, grid=5)], p=0.2),
        v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
        v2.RandomApply([v2.RandomChoice([v2.GaussianNoise(mean=0.0, sigma=0.02, clip=True),
                                         v2.GaussianBlur(kernel_size=7, sigma=(0.1, 1.5))])], p=0.2),
        Clamp(0.0, 1.0),
        Normalize(pre.mean, pre.std),
    ])


def eval_transform(pre: Preprocess) -> Normalize:
    """Evaluation/inference: normalise only (``load_image`` already resized)."""
    return Normalize(pre.mean, pre.std)
