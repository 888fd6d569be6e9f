"""Preprocessing (travels inside checkpoints) and the stage-1 augmentations.

Images arrive from :func:`chx.data.images.load_image` as float32 tensors [1, S, S] in [0, 1],
already resized (letterbox or squash) to ``Preprocess.size``. The models take ONE channel (timm
``in_chans=1``), normalised with a single mean/std (the channel mean of ImageNet's mean/std).

- :func:`eval_transform`: normalise only (the resize happened when loading).
- :func:`train_transform`: the augmentations of METHOD.md stage 1 (torchvision.transforms.v2's
  functional ops plus a fast smooth elastic warp), optionally CLAHE and coarse dropout (``--clahe``,
  ``--coarse-dropout``: the CXR-LT 2024 winner's), then clamp to [0, 1] and normalise. Every random
  choice of one image is drawn first, by :func:`draw_augment` (THE distributions, in torchvision's
  draw order), from torch's global RNG here, so ``torch.manual_seed`` makes it reproducible; the
  batched version on the training device (:mod:`chx.data.batch_augment`, ``--augment-on device``)
  draws through the same function from a generator seeded per image.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from chx.data.images import RESIZE_MODES
from chx.errors import ChxError

__all__ = ["Preprocess", "train_transform", "eval_transform", "Normalize", "Clamp",
           "RandomElastic", "clahe", "RandomCLAHE", "CoarseDropout", "AugmentDraw", "draw_augment",
           "apply_augment", "Augment", "elastic_warp", "noise_field", "cut_holes"]


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

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The coarse displacement [2, grid, grid]; normalised coordinates span 2 units per side, so
        a fraction f of the side is 2 f."""
        return (torch.rand(1, 2, self.grid, self.grid, generator=generator) * 2 - 1)[0] * (2 * self.magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return elastic_warp(x.reshape(1, -1, h, w), self.draw()[None]).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"magnitude={self.magnitude}, grid={self.grid}"


def elastic_warp(x: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] warped by their coarse displacements [N, 2, g, g] (:class:`RandomElastic`):
    bicubic to at most 64 x 64 (smooth), then bilinear to full size (bicubic straight to 1024 x 1024
    costs ~25 ms, this ~4 ms, and the field is the same to the eye); one bilinear ``grid_sample``,
    zero fill."""
    h, w = x.shape[-2:]
    disp = disp.to(x.device, torch.float32)
    disp = F.interpolate(disp, size=(min(h, 64), min(w, 64)), mode="bicubic", align_corners=True)
    disp = F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=True)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # [2, h, w] as (x, y)
    grid = (base[None] + disp).permute(0, 2, 3, 1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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
    dev = x.device
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
    tile_of = (torch.arange(hp, device=dev) // th)[:, None] * tiles + (torch.arange(wp, device=dev) // tw)[None, :]
    index = (torch.arange(n, device=dev)[:, None, None] * tiles * tiles + tile_of[None]) * 256 + padded
    hist = torch.bincount(index.flatten(), minlength=n * tiles * tiles * 256).float()
    hist = hist.reshape(n, tiles, tiles, 256)
    limit = max(int(clip_limit * area / 256), 1)
    excess = (hist - limit).clamp(min=0).sum(-1, keepdim=True)
    hist = hist.clamp(max=limit) + excess / 256
    lut = (hist.cumsum(-1) / area).clamp(0, 1)                                    # [N, t, t, 256]
    # OpenCV's interpolation: tile coordinate of pixel y is y / th - 0.5, clamped at the borders
    ty = torch.arange(h, dtype=torch.float32, device=dev) / th - 0.5
    tx = torch.arange(w, dtype=torch.float32, device=dev) / tw - 0.5
    y0, x0 = ty.floor(), tx.floor()
    wy, wx = (ty - y0)[:, None], (tx - x0)[None, :]                                # [H, 1], [1, W]
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).clamp(max=tiles - 1), (x0 + 1).clamp(max=tiles - 1)
    y0, x0 = y0.clamp(min=0), x0.clamp(min=0)
    img = torch.arange(n, device=dev)[:, None, None]

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

    def draw(self, generator: torch.Generator | None = None) -> float:
        lo, hi = self.clip_limit
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clahe(x, self.draw(), self.tiles)

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

    def draw(self, h: int, w: int, generator: torch.Generator | None = None) -> tuple:
        """``((hole height, hole width), ((top, left), ...))`` for an ``h`` x ``w`` image."""
        sh, sw = max(1, round(self.size * h)), max(1, round(self.size * w))
        n = int(torch.randint(self.holes[0], self.holes[1] + 1, (), generator=generator))
        ys = torch.randint(0, h - sh + 1, (n,), generator=generator).tolist()
        xs = torch.randint(0, w - sw + 1, (n,), generator=generator).tolist()
        return (sh, sw), tuple(zip(ys, xs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cut_holes(x, self.draw(*x.shape[-2:]), self.fill)

    def extra_repr(self) -> str:
        return f"size={self.size}, holes={self.holes}, fill={self.fill}"


def cut_holes(x: torch.Tensor, holes: tuple, fill: float = 0.0) -> torch.Tensor:
    """A copy of ``x`` [..., H, W] with the holes of :meth:`CoarseDropout.draw` set to ``fill``."""
    (sh, sw), corners = holes
    x = x.clone()
    for y0, x0 in corners:
        x[..., y0:y0 + sh, x0:x0 + sw] = fill
    return x


# The stage-1 augmentation's parameters (METHOD.md stage 1; the values of torchvision's transforms).
CROP_SCALE, CROP_RATIO = (0.9, 1.0), (0.9, 1.1)
AFFINE_DEGREES, AFFINE_TRANSLATE, AFFINE_SCALE = 10.0, 0.06, (0.9, 1.1)
JITTER = (0.8, 1.2)                 # brightness and contrast factors
NOISE_SIGMA, BLUR_KERNEL, BLUR_SIGMA = 0.02, 7, (0.1, 1.5)
P_CLAHE, P_FLIP, P_AFFINE, P_ELASTIC, P_JITTER, P_NOISE_OR_BLUR, P_DROPOUT = 0.5, 0.5, 0.5, 0.2, 0.5, 0.2, 0.5
ELASTIC = RandomElastic(magnitude=0.02, grid=5)


@dataclass(frozen=True)
class AugmentDraw:
    """Every random choice of the stage-1 augmentation for one image; None: that step is skipped."""

    clahe: float | None                                  # clip limit
    crop: tuple[int, int, int, int]                      # top, left, height, width (then resized to S)
    flip: bool
    affine: tuple[float, tuple[int, int], float] | None  # angle (degrees), translation (px), scale
    elastic: torch.Tensor | None                         # [2, g, g] coarse displacement
    jitter: tuple[bool, float, float] | None             # brightness first?, brightness, contrast factor
    noise: int | None                                    # seed of the noise field (noise_field)
    blur: float | None                                   # Gaussian sigma (px)
    holes: tuple | None                                  # CoarseDropout.draw's


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return torch.empty(1).uniform_(lo, hi, generator=g).item()


def _applies(p: float, g: torch.Generator | None) -> bool:
    return not torch.rand(1, generator=g) >= p         # torchvision's RandomApply test


def _crop(size: int, g: torch.Generator | None) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.make_params on a ``size`` x ``size`` image."""
    area = size * size
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target = area * _uniform(*CROP_SCALE, g)
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=g)).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            top = int(torch.randint(0, size - h + 1, size=(1,), generator=g))
            return top, int(torch.randint(0, size - w + 1, size=(1,), generator=g)), h, w
    return 0, 0, size, size          # the fallback: the whole (square) image


def draw_augment(size: int, clahe: bool = False, coarse_dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> AugmentDraw:
    """THE random choices of :func:`train_transform` for one image of ``size`` x ``size``, drawn from
    ``generator`` (None: torch's global RNG) in the order, and with the calls, of the torchvision v2
    transforms they replace (so ``torch.manual_seed(s)`` then this equals
    ``torch.Generator().manual_seed(s)`` passed in). The noise field is the one exception: a seed is
    drawn and the field made from it (:func:`noise_field`), so the device makes it, not the CPU."""
    g = generator
    limit = RandomCLAHE().draw(g) if clahe and _applies(P_CLAHE, g) else None
    crop = _crop(size, g)
    flip = _applies(P_FLIP, g)
    affine = None
    if _applies(P_AFFINE, g):
        angle = _uniform(-AFFINE_DEGREES, AFFINE_DEGREES, g)
        shift = float(AFFINE_TRANSLATE * size)
        tx, ty = (int(round(float(_uniform(-shift, shift, g)))) for _ in range(2))
        affine = (angle, (tx, ty), _uniform(*AFFINE_SCALE, g))
    elastic = ELASTIC.draw(g) if _applies(P_ELASTIC, g) else None
    jitter = None
    if _applies(P_JITTER, g):
        order = torch.randperm(4, generator=g).tolist()           # ColorJitter's order of its 4 ops
        jitter = (order.index(0) < order.index(1), _uniform(*JITTER, g), _uniform(*JITTER, g))
    noise = blur = None
    if _applies(P_NOISE_OR_BLUR, g):
        if int(torch.multinomial(torch.tensor([0.5, 0.5]), 1, generator=g)) == 0:
            noise = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        else:
            blur = _uniform(*BLUR_SIGMA, g)
    holes = None
    if coarse_dropout and _applies(P_DROPOUT, g):
        holes = CoarseDropout(coarse_dropout).draw(size, size, g)
    return AugmentDraw(limit, crop, flip, affine, elastic, jitter, noise, blur, holes)


def noise_field(shape, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of ``shape`` made on ``device`` from ``seed`` (the same on the CPU for
    the per-image and the batched augmentation; another stream, same distribution, on a GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device)


def apply_augment(x: torch.Tensor, d: AugmentDraw) -> torch.Tensor:
    """One image [1, S, S] in [0, 1] augmented as ``d`` says, with torchvision's functional ops as
    its v2 transforms apply them (not yet clamped or normalised)."""
    bilinear = v2.InterpolationMode.BILINEAR
    if d.clahe is not None:
        x = clahe(x, d.clahe)
    top, left, h, w = d.crop
    x = TF.resized_crop(x, top, left, h, w, size=list(x.shape[-2:]), interpolation=bilinear, antialias=True)
    if d.flip:
        x = TF.horizontal_flip(x)
    if d.affine is not None:
        angle, shift, scale = d.affine
        x = TF.affine(x, angle=angle, translate=list(shift), scale=scale, shear=[0.0, 0.0],
                      interpolation=bilinear, fill=0)
    if d.elastic is not None:
        x = elastic_warp(x[None], d.elastic[None])[0]
    if d.jitter is not None:
        brightness_first, b, c = d.jitter
        ops = [(TF.adjust_brightness, b), (TF.adjust_contrast, c)]
        for op, factor in ops if brightness_first else ops[::-1]:
            x = op(x, factor)
    if d.noise is not None:
        x = (x + noise_field(x.shape, d.noise, x.device) * NOISE_SIGMA).clamp(0, 1)
    if d.blur is not None:
        x = TF.gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [d.blur, d.blur])
    if d.holes is not None:
        x = cut_holes(x, d.holes)
    return x


class Augment(nn.Module):
    """The stage-1 augmentation of one image [1, S, S]: :func:`draw_augment` from torch's global RNG,
    then :func:`apply_augment`."""

    def __init__(self, size: int, clahe: bool = False, coarse_dropout: float = 0.0):
        super().__init__()
        if coarse_dropout:
            CoarseDropout(coarse_dropout)          # its range check, now
        self.size, self.clahe, self.coarse_dropout = int(size), bool(clahe), float(coarse_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_augment(x, draw_augment(self.size, self.clahe, self.coarse_dropout))

    def extra_repr(self) -> str:
        return f"size={self.size}, clahe={self.clahe}, coarse_dropout={self.coarse_dropout}"


def train_transform(pre: Preprocess, clahe: bool = False, coarse_dropout: float = 0.0) -> v2.Compose:
    """Stage-1 training augmentation for float tensors [1, S, S] in [0, 1] (S = ``pre.size``).

    In order: with ``clahe``, CLAHE (p 0.5, clip limit 1-4, 8 x 8 tiles: :class:`RandomCLAHE`);
    random resized crop (scale 0.9-1, ratio 0.9-1.1, back to S); horizontal flip
    (p 0.5); shift/scale/rotate (p 0.5: translate 6 %, scale 0.9-1.1, rotate 10 deg, black fill);
    smooth elastic distortion (p 0.2); brightness/contrast (p 0.5, factors 0.8-1.2, in a random
    order); Gaussian noise (sigma 0.02) or Gaussian blur (7 x 7, sigma 0.1-1.5 px) (p 0.2); with
    ``coarse_dropout`` > 0, 1-8 black square holes of that fraction of the side (p 0.5:
    :class:`CoarseDropout`); clamp to [0, 1]; normalise. The two options are off by default
    (CheXFusion's augmentation). The choices are :func:`draw_augment`'s.
    """
    return v2.Compose([Augment(pre.size, clahe, coarse_dropout), Clamp(0.0, 1.0), Normalize(pre.mean, pre.std)])


def eval_transform(pre: Preprocess) -> Normalize:
    """Evaluation/inference: normalise only (``load_image`` already resized)."""
    return Normalize(pre.mean, pre.std)
