"""Preprocessing (travels inside checkpoints) and the stage-1 augmentations.

Images arrive from :func:`chx.data.images.load_image` as float32 tensors [1, S, S] in [0, 1],
already resized (letterbox or squash) to ``Preprocess.size``. The models take ONE channel (timm
``in_chans=1``), normalised with a single mean/std (the channel mean of ImageNet's mean/std).

- :func:`eval_transform`: normalise only (the resize happened when loading).
- :func:`train_transform`: the augmentations of METHOD.md stage 1 (torchvision.transforms.v2 plus a
  fast smooth elastic warp), optionally CLAHE and coarse dropout (``--clahe``, ``--coarse-dropout``:
  the CXR-LT 2024 winner's), then clamp to [0, 1] and normalise. All randomness comes from torch's
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
           "RandomElastic", "clahe", "RandomCLAHE", "CoarseDropout"]


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


def clahe(x: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of images [..., H, W] in [0, 1], as OpenCV's
    ``createCLAHE(clip_limit, (tiles, tiles))`` computes it on 8-bit images, in torch.

    Per image: 256 grey levels; the image (reflect-padded to a multiple of ``tiles``) is cut into
    ``tiles`` x ``tiles`` tiles; each tile's histogram is clipped at ``clip_limit`` x its mean bin
    count (at least 1) and the clipped excess spread evenly over the bins (OpenCV spreads the
    remainder of the integer division over every n-th bin: here it is spread as a fraction); the
    tile's cumulative histogram / its pixel count maps a grey level to [0, 1]; each pixel's value is
    the bilinear mix of the maps of the four nearest tile centres. Returns float in [0, 1] on 256
    levels, same shape and dtype as ``x``.
    """
    if clip_limit <= 0 or tiles < 1:
        raise ValueError(f"clahe needs clip_limit > 0 and tiles >= 1, got {clip_limit}, {tiles}")
    h, w = x.shape[-2:]
    flat = x.reshape(-1, h, w)
    levels = (flat.float().clamp(0, 1) * 255).round().long()                      # [N, H, W]
    ph, pw = (-h) % tiles, (-w) % tiles
    padded = levels
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        padded = F.pad(levels[:, None].float(), (0, pw, 0, ph), mode=mode)[:, 0].long()
    n, hp, wp = padded.shape
    th, tw = hp // tiles, wp // tiles
    area = th * tw
    # histogram of every tile: bincount of (image, tile row, tile col, level)
    tile_of = (torch.arange(hp) // th)[:, None] * tiles + (torch.arange(wp) // tw)[None, :]
    index = (torch.arange(n)[:, None, None] * tiles * tiles + tile_of[None]) * 256 + padded
    hist = torch.bincount(index.flatten(), minlength=n * tiles * tiles * 256).float()
    hist = hist.reshape(n, tiles, tiles, 256)
    limit = max(int(clip_limit * area / 256), 1)
    excess = (hist - limit).clamp(min=0).sum(-1, keepdim=True)
    hist = hist.clamp(max=limit) + excess / 256
    lut = (hist.cumsum(-1) / area).clamp(0, 1)                                    # [N, t, t, 256]
    # OpenCV's interpolation: tile coordinate of pixel y is y / th - 0.5, clamped at the borders
    ty = torch.arange(h, dtype=torch.float32) / th - 0.5
    tx = torch.arange(w, dtype=torch.float32) / tw - 0.5
    y0, x0 = ty.floor(), tx.floor()
    wy, wx = (ty - y0)[:, None], (tx - x0)[None, :]                                # [H, 1], [1, W]
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).clamp(max=tiles - 1), (x0 + 1).clamp(max=tiles - 1)
    y0, x0 = y0.clamp(min=0), x0.clamp(min=0)
    img = torch.arange(n)[:, None, None]

    def at(yy, xx):
        return lut[img, yy[None, :, None], xx[None, None, :], levels]

    out = ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1))
           + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1)))
    return out.reshape(x.shape).to(x.dtype)


class RandomCLAHE(nn.Module):
    """:func:`clahe` with its clip limit drawn uniformly from ``clip_limit`` (albumentations' CLAHE
    default: 1-4, 8 x 8 tiles) from torch's global RNG."""

    def __init__(self, clip_limit: tuple[float, float] = (1.0, 4.0), tiles: int = 8):
        super().__init__()
        self.clip_limit, self.tiles = (float(clip_limit[0]), float(clip_limit[1])), int(tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.clip_limit
        limit = lo + (hi - lo) * float(torch.rand(()))
        return clahe(x, limit, self.tiles)

    def extra_repr(self) -> str:
        return f"clip_limit={self.clip_limit}, tiles={self.tiles}"


class CoarseDropout(nn.Module):
    """Zero ``holes`` (drawn uniformly from the inclusive range) square holes of side
    ``round(size x image side)`` (at least 1 px), each placed uniformly inside the image (holes may
    overlap), from torch's global RNG. ``size`` is a fraction of the side in (0, 0.5]."""

    def __init__(self, size: float, holes: tuple[int, int] = (1, 8), fill: float = 0.0):
        super().__init__()
        if not 0 < size <= 0.5:
            raise ChxError(f"--coarse-dropout {size}: the hole side must be a fraction of the image "
                           f"side in (0, 0.5] (e.g. 0.1), or 0 for off")
        if not 1 <= holes[0] <= holes[1]:
            raise ValueError(f"CoarseDropout holes must be 1 <= min <= max, got {holes}")
        self.size, self.holes, self.fill = float(size), (int(holes[0]), int(holes[1])), float(fill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        sh, sw = max(1, round(self.size * h)), max(1, round(self.size * w))
        n = int(torch.randint(self.holes[0], self.holes[1] + 1, ()))
        ys = torch.randint(0, h - sh + 1, (n,)).tolist()
        xs = torch.randint(0, w - sw + 1, (n,)).tolist()
        x = x.clone()
        for y0, x0 in zip(ys, xs):
            x[..., y0:y0 + sh, x0:x0 + sw] = self.fill
        return x

    def extra_repr(self) -> str:
        return f"size={self.size}, holes={self.holes}, fill={self.fill}"


def train_transform(pre: Preprocess, clahe: bool = False, coarse_dropout: float = 0.0) -> v2.Compose:
    """Stage-1 training augmentation for float tensors [1, S, S] in [0, 1] (S = ``pre.size``).

    In order: with ``clahe``, CLAHE (p 0.5, clip limit 1-4, 8 x 8 tiles: :class:`RandomCLAHE`);
    random resized crop (scale 0.9-1, ratio 0.9-1.1, back to S); horizontal flip
    (p 0.5); shift/scale/rotate (p 0.5: translate 6 %, scale 0.9-1.1, rotate 10 deg, black fill);
    smooth elastic distortion (p 0.2); brightness/contrast (p 0.5, factors 0.8-1.2); Gaussian
    noise (sigma 0.02) or Gaussian blur (sigma 0.1-1.5 px) (p 0.2); with ``coarse_dropout`` > 0,
    1-8 black square holes of that fraction of the side (p 0.5: :class:`CoarseDropout`); clamp to
    [0, 1]; normalise. The two options are off by default (CheXFusion's augmentation).
    """
    s = pre.size
    bilinear = v2.InterpolationMode.BILINEAR
    first = [v2.RandomApply([RandomCLAHE()], p=0.5)] if clahe else []
    last = [v2.RandomApply([CoarseDropout(coarse_dropout)], p=0.5)] if coarse_dropout else []
    return v2.Compose([
        *first,
        v2.RandomResizedCrop(s, scale=(0.9, 1.0), ratio=(0.9, 1.1), interpolation=bilinear,
                             antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1),
                                        interpolation=bilinear, fill=0)], p=0.5),
        v2.RandomApply([RandomElastic(magnitude=0.02, grid=5)], p=0.2),
        v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
        v2.RandomApply([v2.RandomChoice([v2.GaussianNoise(mean=0.0, sigma=0.02, clip=True),
                                         v2.GaussianBlur(kernel_size=7, sigma=(0.1, 1.5))])], p=0.2),
        *last,
        Clamp(0.0, 1.0),
        Normalize(pre.mean, pre.std),
    ])


def eval_transform(pre: Preprocess) -> Normalize:
    """Evaluation/inference: normalise only (``load_image`` already resized)."""
    return Normalize(pre.mean, pre.std)
