"""CPU cost of decoding one MIMIC-size chest X-ray JPEG to the paper's 1024 px input, per core.

MIMIC-CXR-JPG images are about 2,500 x 3,000 8-bit grayscale JPEGs. This writes a synthetic image of
that size (smooth structure plus noise, JPEG quality 95), then times `chx.data.images.load_image` at
1024 px (letterbox) with JPEG draft mode (the decoder downscales by 2 while decoding), one thread.
It is the per-image CPU cost that bounds stage 1 and extraction when the GPU is fast (see the
README's scale plan).

    .venv/bin/python benchmarks/bench_decode.py --repeats 20 -o decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=3056, help="image height in pixels (MIMIC: ~3,000)")
    ap.add_argument("--width", type=int, default=2544, help="image width in pixels (MIMIC: ~2,500)")
    ap.add_argument("--size", type=int, default=1024, help="model input size (the paper's 1024)")
    ap.add_argument("--repeats", type=int, default=20, help="timed decodes (median reported)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from chx.data.images import load_image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:a.height, 0:a.width]
    img = (120 + 60 * np.sin(x / 90.0) * np.cos(y / 130.0) + rng.normal(0, 12, (a.height, a.width)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cxr.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)
        load_image(path, a.size)   # warm-up
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            load_image(path, a.size)
            times.append(time.perf_counter() - t)
        size_kib = path.stat().st_size / 1024
    out = {"image": f"{a.width}x{a.height} JPEG q95, {size_kib:.0f} KiB", "size": a.size,
           "median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times), "repeats": a.repeats,
           "images_per_s_per_core": 1 / statistics.median(times)}
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
