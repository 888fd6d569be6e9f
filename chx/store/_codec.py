"""How feature maps are stored: the dtype encodings, the per-shard checksum and the shard size rule.

Three stored dtypes of feature maps; every read of them decodes to float16 (what the fusion model
consumes); and ``uint8``, the image cache's (``chx cache-images``: images quantized to 8-bit steps),
stored and read back as is:

- ``float16``: the maps as float16 (2 bytes per value), decoded as is.
- ``bfloat16``: the upper 16 bits of the float32 value, rounded to nearest even, kept as uint16
  bits (2 bytes per value): 8 significant bits (3 fewer than float16), so
  |decode(encode(x)) - x| <= 2**-8 * |x| + 2**-25 (the second term: float16's subnormal half-step).
  Decoded to float16; values beyond float16's +-65504 are clipped to it (backbone maps are far inside).
- ``uint8``: values 0..255 as given (floats are rounded and clipped), decoded as is (uint8).
- ``float8``: e4m3 (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, max 448) of the
  value divided by a per-image, per-channel float32 scale = amax / 448 (amax = the channel's max
  |value| in that image), kept as uint8 (1 byte per value + 4 bytes per channel). Round-trip
  bound, per channel c of an image: |decode(encode(x)) - x| <= 2**-4 * |x| + 2**-18 * amax_c
  (half a step of 3 mantissa bits, the subnormal step of e4m3 times the scale, and the float16
  rounding of the decoded value); so never more than amax_c / 16.

Checksums are CRC-32C (``google_crc32c``, a zarr dependency; hardware CRC, ~10 GB/s on one core)
of the encoded bytes of a shard's rows, per array, so a checksum does not depend on the backend.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FEATURE_DTYPES = ("float16", "bfloat16", "float8")    # what extract-features may write (--dtype)
DTYPES = FEATURE_DTYPES + ("uint8",)                  # what a store may hold (uint8: the image cache)
STORED_NUMPY = {"float16": np.dtype("float16"), "bfloat16": np.dtype("uint16"), "float8": np.dtype("uint8"),
                "uint8": np.dtype("uint8")}
DECODED_DTYPE = np.dtype("float16")
FLOAT8_MAX = 448.0                     # largest finite e4m3fn value
FLOAT16_MAX = 65504.0
CHECKSUM = "crc32c"

# The shard size rule (images per shard, S) of format-2 stores.
SHARD_TARGET_BYTES = 256 * 2**20       # ~256 MiB of one feature array per shard object
MAX_SHARD_IMAGES = 512                 # bounds a writer's buffer and what a killed writer loses
IMAGES_PER_OBJECT = 64                 # at least 64 images per object of a shard, all arrays counted


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def has_scale(dtype: str) -> bool:
    return dtype == "float8"


def stored_bytes_per_map(feature_shape: Sequence[int], dtype: str) -> int:
    """Bytes of one image's map of one feature array as stored: C*H*W*itemsize (+ C*4 for the float8 scale)."""
    c, h, w = (int(s) for s in feature_shape)
    return c * h * w * STORED_NUMPY[dtype].itemsize + (c * 4 if has_scale(dtype) else 0)


def objects_per_shard(dtype: str, flip: bool) -> int:
    """Objects one shard takes in a Zarr format-2 store: features (+ features_flip) (+ scale) + done marker."""
    return 1 + int(flip) + int(has_scale(dtype)) + 1


def default_shard_images(n_images: int, feature_shape: Sequence[int], dtype: str, flip: bool) -> int:
    """Images per shard S for a new store: enough for ~256 MiB of one feature array per shard object,
    at least 64 images per object of a shard (so at most 1 object per 64 images, flip, scale and done
    marker counted), at most 512, and never more than n_images.

    The paper's map (768x32x32) gives S = 171 (float16), 192 (float16 + flip: 3 objects per shard),
    341 (float8, with or without flip: 4 objects at most, floor 256); maps of 10 KiB give 512."""
    per_map = max(1, stored_bytes_per_map(feature_shape, dtype))
    floor = IMAGES_PER_OBJECT * objects_per_shard(dtype, flip)
    s = min(max(math.ceil(SHARD_TARGET_BYTES / per_map), floor), max(MAX_SHARD_IMAGES, floor))
    return max(1, min(s, int(n_images)))


# ----------------------------------------------------------------------------------- encodings
class NonFiniteError(ValueError):
    """A map holds NaN or inf, which float8 cannot scale (``index``: the first such image)."""

    def __init__(self, index: int):
        super().__init__(f"image {index} of the batch has non-finite feature values")
        self.index = index


def encode(maps: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Maps [n, C, H, W] (any float dtype) -> (stored [n, C, H, W] in STORED_NUMPY[dtype], C-contiguous;
    scale [n, C] float32 for float8, else None). CPU cost of float8 (2-core machine, one thread):
    ~6 ms per 768x32x32 map."""
    if dtype == "float16":
        return np.ascontiguousarray(maps, dtype=np.float16), None
    if dtype == "uint8":
        maps = np.asarray(maps)
        if maps.dtype != np.uint8:
            maps = np.clip(np.rint(maps), 0, 255)
        return np.ascontiguousarray(maps, dtype=np.uint8), None
    import torch   # fast casts to bfloat16 / float8 (numpy has neither)

    src = torch.from_numpy(np.ascontiguousarray(maps))
    if dtype == "bfloat16":
        return src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    if src.numel() == 0:
        return np.zeros(src.shape, np.uint8), np.ones(src.shape[:2], np.float32)
    # amax from max and min (no |x| copy), in the input's dtype: exact, float16 or float32 alike
    amax = torch.maximum(src.amax(dim=(2, 3)), src.amin(dim=(2, 3)).neg_()).to(torch.float32)
    bad = ~torch.isfinite(amax).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(int(torch.nonzero(bad)[0, 0]))
    scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax))   # all-zero channel: any scale
    q = src.to(torch.float32, copy=True).div_(scale[:, :, None, None]).clamp_(-FLOAT8_MAX, FLOAT8_MAX)
    return q.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), scale.numpy()


def decode(stored, dtype: str, scale=None):
    """Stored maps [n, C, H, W] -> float16 [n, C, H, W] (float8 needs its scale [n, C] float32); uint8
    stays uint8 (the image cache's rows).

    numpy in, numpy out; a torch tensor in (e.g. raw maps already moved to the GPU), a tensor out
    on the same device, so a reader can decode where the compute is: on one CPU core float8 decodes
    at ~6-9 ms per 768x32x32 map, ten times longer than reading its 0.75 MiB from a disk."""
    import torch

    as_numpy = isinstance(stored, np.ndarray)
    if dtype in ("float16", "uint8"):
        return stored
    t = torch.from_numpy(np.ascontiguousarray(stored)) if as_numpy else stored
    if dtype == "bfloat16":
        f = t.view(torch.int16).view(torch.bfloat16).to(torch.float32)
    else:
        sc = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)) if isinstance(scale, np.ndarray) \
            else scale.to(device=t.device, dtype=torch.float32)
        f = t.view(torch.float8_e4m3fn).to(torch.float32).mul_(sc[:, :, None, None])
    out = f.clamp_(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
    return out.numpy() if as_numpy else out


def crc32c(values: np.ndarray | None) -> int:
    """CRC-32C of an array's bytes in C order (0 for None)."""
    if values is None:
        return 0
    import google_crc32c

    return int(google_crc32c.value(np.ascontiguousarray(values).reshape(-1).view(np.uint8)))


# ------------------------------------------------------------------------------- bound checksums
# Stores made since issue 26 (attribute ``integrity`` >= 1) bind every checksum to its place: a
# shard's CRC-32C starts from the bytes of a binding (the store's fingerprint, the array, the shard
# or row index and the image ids there), then runs over the data, so a shard or a row copied from
# another store, or moved to another index, fails its check although its bytes are intact.
INTEGRITY = 1


def bound_crc32c(binding: str, values: np.ndarray | None) -> int:
    """CRC-32C of ``binding`` (UTF-8) followed by the array's bytes in C order (0 for None)."""
    if values is None:
        return 0
    import google_crc32c

    crc = google_crc32c.value(binding.encode("utf-8"))
    return int(google_crc32c.extend(crc, np.ascontiguousarray(values).reshape(-1).view(np.uint8)))


def row_crc32c(bindings: list[str], values: np.ndarray) -> np.ndarray:
    """uint32 [n]: :func:`bound_crc32c` of each row of values [n, ...] with its binding."""
    values = np.ascontiguousarray(values)
    return np.array([bound_crc32c(b, values[i]) for i, b in enumerate(bindings)], dtype=np.uint32)


def meta_crc32c(values) -> int:
    """CRC-32C of a metadata array in a canonical form: strings as JSON, numbers little-endian
    (int64 / float32, NaN canonical), so the value does not depend on the backend."""
    import json

    import google_crc32c

    arr = np.asarray(values)
    if arr.dtype.kind in "OUS":
        raw = json.dumps(["" if v is None else str(v) for v in arr.reshape(-1).tolist()], ensure_ascii=False)
        return int(google_crc32c.value(raw.encode("utf-8")))
    if arr.dtype.kind == "f":
        arr = np.where(np.isnan(arr), np.float32(np.nan), arr).astype("<f4")
    else:
        arr = arr.astype("<i8")
    return int(google_crc32c.value(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def nonfinite_rows(stored: np.ndarray, dtype: str) -> np.ndarray:
    """bool [n]: which rows of stored maps [n, ...] hold NaN or inf (from the bits, no decode)."""
    flat = np.ascontiguousarray(stored).reshape(len(stored), -1)
    if dtype == "uint8":                       # integers: never NaN or inf
        return np.zeros(len(flat), dtype=bool)
    if dtype == "float8":                      # e4m3fn: no inf; NaN is S.1111.111
        return ((flat.view(np.uint8) & 0x7F) == 0x7F).any(axis=1)
    bits = flat.view(np.uint16)
    mask = 0x7C00 if dtype == "float16" else 0x7F80
    return ((bits & mask) == mask).any(axis=1)
