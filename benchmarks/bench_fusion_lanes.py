"""Streamed `train-fusion` (--preload off) with DataLoader workers: one lane of the study order per
worker (each shard read by one worker) against the plain shard-local order (every worker reads
every shard of its buffers). Same store, same model, same run; shard reads counted in the workers.

    .venv/bin/python benchmarks/bench_fusion_lanes.py -o benchmarks/results/bench_fusion_lanes

A synthetic complete store (random float16 maps, 2 views per study) is written once; then, for each
repetition, one run with lanes and one without, in alternating order. Reads come from the page
cache (the store fits in memory), so the figures are the CPU cost of the extra reads (checksums,
decoding, copies), not a disk's. Medians of the repetitions; the ratio is per repetition.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


def make_store(path: str, studies: int, shape: tuple[int, ...], shard_images: int) -> None:
    from chx.store import create_store

    n = 2 * studies
    rng = np.random.default_rng(0)
    with create_store(path, image_ids=[f"i{i}" for i in range(n)], study_ids=[f"s{i // 2}" for i in range(n)],
                      views=["PA", "LATERAL"] * studies, splits=["train"] * n,
                      labels=np.repeat(rng.integers(0, 2, (studies, 4)), 2, axis=0).astype(np.float32),
                      class_names=list("abcd"),
                      feature_shape=shape, fingerprint={"model": "bench"}, flip=False,
                      shard_images=shard_images) as st:
        for a in range(0, n, 256):
            b = min(a + 256, n)
            st.write(np.arange(a, b), rng.standard_normal((b - a, *shape), dtype=np.float32))
        st.mark_complete()


def one_run(store: str, out: Path, workers: int, lanes: bool, epochs: int, batch_size: int, log: Path) -> dict:
    import chx.pipeline.train_fusion as tf
    from chx.options import FusionOptions, TrainConfig

    make = tf.make_objective
    if not lanes:    # the plain shard-local order
        tf.make_objective = lambda *a, **kw: make(*a, **{**kw, "lanes": 1})
    try:
        log.write_text("")
        t0 = time.perf_counter()
        tf.train_fusion(store, out, FusionOptions(dim=64, heads=4, ffn_dim=128, preload="off"),
                        TrainConfig(epochs=epochs, batch_size=batch_size, workers=workers, device="cpu",
                                    val_every=1000, log_every=10**6, progress_every=1e9), overwrite=True)
        seconds = time.perf_counter() - t0
    finally:
        tf.make_objective = make
    reads = len(log.read_text().splitlines())
    return {"seconds": seconds, "shard_reads": reads}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=600)
    ap.add_argument("--shape", default="768,16,16", help="C,H,W of one image's maps (float16)")
    ap.add_argument("--shard-images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--out", type=Path, default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    from chx.data.study_dataset import StudyDataset

    shape = tuple(int(x) for x in a.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="chx-lanes-"))
    store = str(work / "s.zarr")
    make_store(store, a.studies, shape, a.shard_images)
    log = work / "reads.log"
    read = StudyDataset._read_shard

    def logged(self, k):     # forked workers inherit it
        if self.train:
            with open(log, "a") as f:
                f.write(f"{k}\n")
        return read(self, k)

    StudyDataset._read_shard = logged
    n_shards = -(-2 * a.studies // a.shard_images)
    runs = {"lanes": [], "plain": []}
    for rep in range(a.repeats):
        for mode in (("lanes", "plain") if rep % 2 == 0 else ("plain", "lanes")):
            r = one_run(store, work / mode, a.workers, mode == "lanes", a.epochs, a.batch_size, log)
            runs[mode].append(r)
            print(f"rep {rep} {mode}: {r['seconds']:.1f} s, {r['shard_reads']} shard reads "
                  f"({n_shards} shards x {a.epochs} epochs)", flush=True)
    ratios = [p["seconds"] / q["seconds"] for p, q in zip(runs["plain"], runs["lanes"])]
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": shlex.join([".venv/bin/python", "benchmarks/bench_fusion_lanes.py",
                                  *(argv if argv is not None else sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "args": {k: str(v) for k, v in vars(a).items()}, "n_shards": n_shards, "runs": runs,
           "median_s": {m: statistics.median(r["seconds"] for r in v) for m, v in runs.items()},
           "median_reads": {m: statistics.median(r["shard_reads"] for r in v) for m, v in runs.items()},
           "plain_over_lanes": statistics.median(ratios)}
    mib = np.prod(shape) * 2 * a.shard_images / 2**20
    md = (f"# Streamed train-fusion with {a.workers} workers: lanes vs the plain shard-local order\n\n"
          f"{res['date']}, {platform.platform()}, {os.cpu_count()} CPUs. Command: `{res['command']}`.\n\n"
          f"{a.studies} studies x 2 views, maps {a.shape} float16, {a.shard_images} images ({mib:.0f} MiB) "
          f"per shard, {n_shards} shards, {a.epochs} epochs, batch {a.batch_size}; medians of {a.repeats}.\n\n"
          f"| order | seconds | shard reads |\n|---|---:|---:|\n"
          f"| lanes (one per worker) | {res['median_s']['lanes']:.1f} | {res['median_reads']['lanes']:.0f} |\n"
          f"| plain shard-local | {res['median_s']['plain']:.1f} | {res['median_reads']['plain']:.0f} |\n\n"
          f"plain / lanes time: {res['plain_over_lanes']:.2f} (median of the per-repetition ratios).\n")
    write_results(a.out, res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
