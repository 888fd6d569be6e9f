"""Write throughput of the feature store alone (precomputed maps, no model): the ceiling that
extraction can reach however fast the GPU is. Per backend, with and without compression, and with
one or two writes in flight (`extract-features` keeps one write in flight; on the 2-core machine of
2026-11-29 a second one made no difference beyond run-to-run spread).

    .venv/bin/python benchmarks/bench_store_write.py [--shape 768,32,32] [--images 256] [--repeats 3]

The default shape is the paper's (convnext_small at 1024 px: 768 x 32 x 32 float16 = 1.5 MiB per
image). The maps are random normal float16, which compress about like real ones (1.09x with zstd).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def write_rate(path: Path, n: int, shape, batch: int, compress: bool, in_flight: int) -> tuple[float, float]:
    """(images/s, compression ratio) writing n images in batches into a fresh store."""
    from chx.store import create_store

    feats = (np.random.default_rng(0).standard_normal((batch, *shape)) * 2).astype(np.float16)
    store = create_store(str(path), image_ids=[f"i{i}" for i in range(n)], study_ids=[f"s{i // 2}" for i in range(n)],
                         views=["PA", "LATERAL"] * (n // 2) + ["PA"] * (n % 2), splits=["train"] * n,
                         labels=np.zeros((n, 1)), class_names=["x"], feature_shape=shape,
                         fingerprint={"model": "bench"}, compress=compress)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(lambda i: store.write(np.arange(i, min(i + batch, n)), feats[: min(batch, n - i)]),
                      range(0, n, batch)))
    rate = n / (time.perf_counter() - t0)
    ratio = store.info()["compression_ratio"] or 1.0
    store.close()
    return rate, ratio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="768,32,32", help="C,H,W of one image's maps")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="folder on the disk to measure (default: a temp dir)")
    a = ap.parse_args(argv)
    shape = tuple(int(x) for x in a.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="chx-bench-write-", dir=a.work))
    mib = np.prod(shape) * 2 / 2**20
    cases = [("zarr", False, 1), ("zarr", False, 2), ("zarr", True, 1), ("zarr", True, 2),
             ("hdf5", False, 1), ("hdf5", True, 1)]
    rows = []
    print(f"store writes of {a.images} images of {shape} float16 ({mib:.2f} MiB each), batch {a.batch_size}, "
          f"median of {a.repeats}:")
    for backend, compress, in_flight in cases:
        rates = []
        for r in range(a.repeats):
            path = work / f"s{r}.{'h5' if backend == 'hdf5' else 'zarr'}"
            rate, ratio = write_rate(path, a.images, shape, a.batch_size, compress, in_flight)
            rates.append(rate)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        rate = statistics.median(rates)
        name = f"{backend} {'compressed' if compress else 'uncompressed'}, {in_flight} write(s) in flight"
        print(f"  {name:<44} {rate:7.0f} images/s  {rate * mib:6.0f} MiB/s  compression {ratio:.2f}")
        rows.append({"benchmark": f"store write ceiling: {name}", "value": f"{rate:.0f} images/s",
                     "detail": f"{shape} fp16, {rate * mib:.0f} MiB/s, compression {ratio:.2f}", "target": ""})
    shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
