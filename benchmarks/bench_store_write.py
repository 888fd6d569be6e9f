"""Write throughput of the feature store alone (precomputed maps, no model): the ceiling that
extraction can reach however fast the GPU is. Per layout and backend, with and without compression,
and with one or two shard writes in flight (writers own whole shards, so two threads never touch
the same object). Format 2 (sharded) is written shard by shard through `write_shard`, as extraction
does; format 1 (one object per image, older stores) in batches of --batch-size rows.

    .venv/bin/python benchmarks/bench_store_write.py [--shape 768,32,32] [--images 256] [--repeats 3]

The default shape is the paper's (convnext_small at 1024 px: 768 x 32 x 32 float16 = 1.5 MiB per
image). The maps are random normal float16, which compress about like real ones (1.09x with zstd).
For the disk-scale figures (GiB written, cold reads, against the raw disk) see bench_store_scale.py.
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


def write_rate(path: Path, n: int, shape, batch: int, compress: bool, in_flight: int, format_version: int,
               shard_images: int | None) -> tuple[float, float]:
    """(images/s, compression ratio) writing n images into a fresh store."""
    from chx.store import create_store

    store = create_store(str(path), image_ids=[f"i{i}" for i in range(n)], study_ids=[f"s{i // 2}" for i in range(n)],
                         views=["PA", "LATERAL"] * (n // 2) + ["PA"] * (n % 2), splits=["train"] * n,
                         labels=np.zeros((n, 1)), class_names=["x"], feature_shape=shape,
                         fingerprint={"model": "bench"}, compress=compress, format_version=format_version,
                         shard_images=shard_images if format_version == 2 else None)
    unit = store.shard_images if format_version == 2 else batch
    feats = (np.random.default_rng(0).standard_normal((unit, *shape)) * 2).astype(np.float16)
    if format_version == 2:
        def one(s):
            a, b = store.shard_rows(s)
            store.write_shard(s, feats[:b - a])
        units = range(store.n_shards)
    else:
        def one(i):
            store.write(np.arange(i, min(i + batch, n)), feats[: min(batch, n - i)])
        units = range(0, n, batch)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(one, units))
    rate = n / (time.perf_counter() - t0)
    ratio = store.info()["compression_ratio"] or 1.0
    store.close()
    return rate, ratio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="768,32,32", help="C,H,W of one image's maps")
    ap.add_argument("--images", type=int, default=256, help="images per store")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per write of format 1")
    ap.add_argument("--shard-images", type=int, default=None,
                    help="images per shard of format 2 (default: the store's rule from the map size)")
    ap.add_argument("--repeats", type=int, default=3, help="stores per case (the median is reported)")
    ap.add_argument("--work", type=Path, default=None, help="folder on the disk to measure (default: a temp dir)")
    a = ap.parse_args(argv)
    shape = tuple(int(x) for x in a.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="chx-bench-write-", dir=a.work))
    mib = np.prod(shape) * 2 / 2**20
    cases = [("zarr", 2, False, 1), ("zarr", 2, False, 2), ("zarr", 2, True, 1), ("zarr", 1, False, 1),
             ("hdf5", 2, False, 1), ("hdf5", 2, True, 1)]
    rows = []
    print(f"store writes of {a.images} images of {shape} float16 ({mib:.2f} MiB each), median of {a.repeats}:")
    for backend, version, compress, in_flight in cases:
        rates = []
        for r in range(a.repeats):
            path = work / f"s{r}.{'h5' if backend == 'hdf5' else 'zarr'}"
            rate, ratio = write_rate(path, a.images, shape, a.batch_size, compress, in_flight, version, a.shard_images)
            rates.append(rate)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        rate = statistics.median(rates)
        name = (f"{backend} format {version} {'compressed' if compress else 'uncompressed'}, "
                f"{in_flight} write(s) in flight")
        print(f"  {name:<56} {rate:7.0f} images/s  {rate * mib:6.0f} MiB/s  compression {ratio:.2f}")
        rows.append({"benchmark": f"store write ceiling: {name}", "value": f"{rate:.0f} images/s",
                     "detail": f"{shape} fp16, {rate * mib:.0f} MiB/s, compression {ratio:.2f}", "target": ""})
    shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
