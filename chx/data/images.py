"""Image decoding and resizing: every file becomes one float32 grayscale array in [0, 1].

Formats: anything Pillow reads (PNG, JPEG, TIFF, ...: 8-bit, 16-bit, RGB(A), LA, palette) and DICOM
(pydicom; compressed transfer syntaxes need a decoder plugin: Pillow handles JPEG Baseline,
pylibjpeg or gdcm the others).

Value mapping:
- 8-bit images: value / 255; 16-bit ('I;16', or 'I' within 0..65535): value / 65535; colour:
  ITU-R 601 luminance (0.299 R + 0.587 G + 0.114 B) of the RGB channels, alpha ignored; float
  images already in [0, 1] stay, others are min-max scaled.
- DICOM: stored values -> modality LUT (rescale slope/intercept) -> VOI LUT or window centre/width
  when the file has one -> min-max scaled to [0, 1] -> inverted when MONOCHROME1 (0 = white), so
  bright is always dense. Multi-frame: the first frame.
- A constant image becomes zeros. The result never holds NaN or values outside [0, 1].
- ``load_image`` (what every reader calls) quantizes after resizing to 8-bit steps,
  round(x * 255) / 255: the one rule that lets ``chx cache-images`` store uint8 and give back the
  same tensors exactly.

Errors (missing, not an image, truncated, decompression bomb, undecodable DICOM) raise
:class:`chx.errors.ImageReadError` with one line naming the file and what to do.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from chx.errors import ImageReadError

__all__ = ["read_image", "load_image", "RESIZE_MODES", "is_dicom"]

RESIZE_MODES = ("letterbox", "squash")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ----------------------------------------------------------------------------------------- reading

def is_dicom(path: str | Path) -> bool:
    """A ``.dcm``/``.dicom`` name, or the ``DICM`` magic at byte 128 (files named otherwise)."""
    path = Path(path)
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_tags(path: str | Path, *names: str) -> dict[str, str] | None:
    """Header values of a DICOM file as stripped strings ('' when absent), read without its pixels;
    None when the header cannot be read. The one reader of DICOM headers (views, modality)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(names))
    except Exception:   # noqa: BLE001 - any unreadable header is reported by the caller
        return None
    return {n: str(ds.get(n, "") or "").strip() for n in names}


def read_image(path: str | Path, *, draft_size: int | None = None) -> np.ndarray:
    """Decode an image file into a float32 array [H, W] in [0, 1] (grayscale; see the module doc).

    ``draft_size`` (optional, JPEG only): let the JPEG decoder downscale by 1/2, 1/4 or 1/8 while
    both sides stay >= ``draft_size``; several times faster for large files that are resized
    afterwards anyway (``load_image`` uses it).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: image file not found; check the path and --images root")
    if not path.is_file():
        raise ImageReadError(f"{path}: is not a file (a directory?); the manifest path must name an "
                             f"image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes); re-copy or re-download it, or "
                             f"remove its row from the manifest")
    if is_dicom(path):
        arr = _read_dicom(path)
    else:
        arr = _read_pillow(path, draft_size)
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: decoded to shape {arr.shape}, expected a 2-D image; "
                             f"convert it to a single grayscale or RGB image")
    return _finite_unit(arr)


def _bomb_error(path: Path, exc: Exception) -> ImageReadError:
    found = re.search(r"(\d+) pixels", str(exc))  # Pillow: "Image size (N pixels) exceeds ..."
    limit = Image.MAX_IMAGE_PIXELS
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return ImageReadError(
        f"{path}: {pixels} exceed Pillow's decompression-bomb limit of {limit:,} pixels "
        f"(PIL.Image.MAX_IMAGE_PIXELS); if the file is genuine, downscale it or raise that limit")


def _read_pillow(path: Path, draft_size: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as errors.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft_size and img.format == "JPEG":
                    img.draft("L" if img.mode in ("RGB", "YCbCr", "L") else None,
                              (int(draft_size), int(draft_size)))
                img.load()  # full decode: a truncated file fails here (LOAD_TRUNCATED_IMAGES off)
                img = _exif_upright(img)
                return _pil_to_gray(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(path, e) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image Pillow can identify (PNG, JPEG, TIFF, ...) nor a "
                             f"DICOM file; replace it or drop its row from the manifest") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        what = "truncated or corrupt" if _looks_truncated(e) else "cannot be decoded"
        raise ImageReadError(f"{path}: image file is {what} ({type(e).__name__}: {_one_line(e)}); "
                             f"re-download or re-export it, or drop its row from the manifest") from None


def _looks_truncated(e: Exception) -> bool:
    msg = str(e).lower()
    return any(s in msg for s in ("truncated", "broken", "premature", "end of file", "eof"))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or "no detail"


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF must not make an otherwise good image fail
        return img
    if orientation in (None, 1):
        return img
    from PIL import ImageOps
    return ImageOps.exif_transpose(img)


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode in ("L", "LA", "La"):
        band = img.getchannel(0) if mode != "L" else img
        return np.asarray(band, dtype=np.float32) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32) / 65535.0
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() <= 65535:  # 16-bit data held as 32-bit
            return a.astype(np.float32) / 65535.0
        return _minmax(a.astype(np.float64))
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        finite = a[np.isfinite(a)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            return a
        return _minmax(a.astype(np.float64))
    if mode not in ("RGB", "RGBA", "RGBX"):
        img = img.convert("RGBA" if "A" in mode or "transparency" in img.info else "RGB")
    rgb = np.asarray(img)[..., :3]
    return (rgb.astype(np.float32) @ _LUMA) / 255.0


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise ImageReadError(f"{path}: is DICOM, and reading DICOM needs pydicom: "
                             f"pip install pydicom pylibjpeg pylibjpeg-libjpeg") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as e:
            raise ImageReadError(f"{path}: not a valid DICOM file ({_one_line(e)}); re-export it, "
                                 f"or drop its row from the manifest") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            raise ImageReadError(f"{path}: DICOM file is truncated or corrupt "
                                 f"({type(e).__name__}: {_one_line(e)}); re-download it") from None
    eof = [w for w in caught if "end of file" in str(w.message).lower()]
    if eof:
        raise ImageReadError(f"{path}: DICOM file is truncated ({_one_line(eof[0].message)}); "
                             f"re-download or re-export it")
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"{path}: DICOM file has no pixel data (a report or presentation state, "
                             f"or a truncated file); drop its row from the manifest")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            arr = pixel_array(ds, index=0)  # first frame only (all of a single-frame image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(path, e) from None
    except Exception as e:
        msg = str(e).lower()
        if "decompression bomb" in msg:  # pydicom wraps the Pillow plugin's error
            raise _bomb_error(path, e) from None
        if "missing dependencies" in msg or "no pixel data decoders" in msg:
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", syntax)
            raise ImageReadError(f"{path}: no DICOM decoder for its transfer syntax ({name}); "
                                 f"pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
                                 f"(or python-gdcm), or convert the file") from None
        # A truncated or corrupt compressed stream, an inconsistent header, ...
        raise ImageReadError(f"{path}: DICOM pixel data cannot be decoded ({type(e).__name__}: "
                             f"{_one_line(e)}); the file may be truncated or corrupt; "
                             f"re-download or re-export it") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or arr.ndim == 3:  # colour DICOM (rare for radiographs): luminance, min-max
        rgb = arr[..., :3].astype(np.float64) if arr.ndim == 3 else arr.astype(np.float64)
        gray = rgb @ _LUMA.astype(np.float64) if rgb.ndim == 3 else rgb
        return _minmax(gray)
    try:
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds, index=0)
    except Exception as e:
        raise ImageReadError(f"{path}: DICOM modality/VOI LUT cannot be applied ({type(e).__name__}: "
                             f"{_one_line(e)}); fix the file's rescale or window attributes") from None
    out = _minmax(np.asarray(values, dtype=np.float64))
    if photometric == "MONOCHROME1" and out.any():  # 0 = white; a constant image stays zeros
        out = 1.0 - out
    return out


def _minmax(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over finite values; constant (or all-NaN) -> zeros."""
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.float32)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi <= lo:
        return np.zeros(a.shape, np.float32)
    out = (np.where(finite, a, lo) - lo) / (hi - lo)
    return out.astype(np.float32)


def _finite_unit(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float32)  # a copy: never hand back Pillow's or pydicom's buffer
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(a, 0.0, 1.0, out=a)


# ---------------------------------------------------------------------------------------- resizing

def _resize_tensor(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize a 2-D image to [size, size] float32 (antialiased bilinear, deterministic).

    ``letterbox`` keeps the aspect ratio: the longer side becomes ``size`` and the image is
    centred on a zero (black) square. ``squash`` stretches both sides to ``size`` (the reference
    implementation's behaviour).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D image [H, W], got shape {tuple(t.shape)}")
    h, w = t.shape
    if mode == "squash":
        new_h, new_w = size, size
    else:
        scale = size / max(h, w)
        new_h = min(size, max(1, round(h * scale)))
        new_w = min(size, max(1, round(w * scale)))
    if (new_h, new_w) == (h, w):
        resized = t.to(torch.float32).contiguous()
    else:
        resized = F.interpolate(t[None, None].to(torch.float32), size=(new_h, new_w), mode="bilinear",
                                align_corners=False, antialias=True)[0, 0]
    if (new_h, new_w) == (size, size):
        out = resized.clone() if resized.data_ptr() == t.data_ptr() else resized
    else:
        out = torch.zeros((size, size), dtype=torch.float32)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        out[top:top + new_h, left:left + new_w] = resized
    return out.clamp_(0.0, 1.0)


def load_image(path: str | Path, size: int, mode: str = "letterbox") -> torch.Tensor:
    """Read, resize and quantize: float32 tensor [1, size, size] in [0, 1], every value a multiple
    of 1/255 (what the datasets call).

    THE quantization rule: after resizing, ``x = round(x * 255) / 255`` (float32). So an 8-bit image
    cache reproduces it exactly: :func:`to_uint8` of this tensor is ``round(x * 255)``, and
    :func:`from_uint8` of that is this tensor again, bit for bit (``chx cache-images``)."""
    arr = read_image(path, draft_size=int(size))
    return _resize_tensor(torch.from_numpy(arr), size, mode)[None].mul_(255).round_().div_(255)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A tensor of :func:`load_image` -> its 8-bit steps round(x * 255) as uint8 (what the image cache holds)."""
    return image.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def from_uint8(steps: torch.Tensor) -> torch.Tensor:
    """uint8 steps -> float32 steps / 255: equal to :func:`load_image`'s tensor they came from."""
    return steps.to(torch.float32).div_(255)
