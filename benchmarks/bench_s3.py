"""The feature store on a local S3 server: write and read rates against plain s3fs calls on the same bytes.

Starts moto's S3 server on 127.0.0.1 (a free port, its own process: benchmarks/common.py `moto_s3`)
and, per shard size and repetition, in the same run:

  write   a store of --images random float16 maps written through the store API as
          `extract-features` writes it (`create_store`, then `ShardBuffer.add` in batches of
          --batch-size rows: each shard written whole with its done marker and checksums), against
          the same bytes put with plain `fs.pipe_file`, one object per shard;
  read    every shard read back with `read_shard` (the store API), and every study read through
          `StudyDataset(preload="off")` in store order (train-fusion's streaming reader: whole
          shards, cached), against plain `fs.cat_file` of each shard object;
  random  --random-studies studies in a random order through `StudyDataset(cache_shards=0)` (one
          read per study: evaluation or a shuffle that is not shard-local), against plain ranged
          `fs.cat_file(key, start, end)` of the same studies' bytes.

Rates are MB/s (10^6 bytes) of feature payload (images x C x H x W x 2 bytes); the store's one-off
costs (creating the store, marking it complete, opening it: a few small objects each) are reported
apart, in seconds. Each figure is the median of --repeats repetitions; store and plain alternate
which goes first. Ratio = store / plain, each from the same repetitions (target >= 0.8). A second,
small map shape (--demo-shape: the demo's convnext_atto at 128 px) is measured at the store's
default shard size.

    .venv/bin/python benchmarks/bench_s3.py [--shape 768,8,8] [--images 1024]
        [--shard-images 64,128,256,512] [--repeats 3] [-o benchmarks/results/bench_s3]

Needs the s3 and dev extras (s3fs, moto[server]); nothing leaves the loopback address.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import moto_s3, write_results  # noqa: E402

BUCKET = "chx-bench"


def make_store(url: str, feats: np.ndarray, shard_images: int | None, batch: int) -> dict:
    """Write feats [n, C, H, W] into a new store as extraction does; seconds of each part."""
    from chx.store import ShardBuffer, create_store

    n = len(feats)
    t0 = time.perf_counter()
    store = create_store(url, image_ids=[f"i{i:06d}" for i in range(n)], study_ids=[f"s{i // 2:06d}" for i in range(n)],
                         views=["PA", "LATERAL"] * (n // 2) + ["PA"] * (n % 2), splits=["train"] * n,
                         labels=np.zeros((n, 1), dtype=np.float32), class_names=["x"],
                         feature_shape=feats.shape[1:], fingerprint={"model": "bench"}, shard_images=shard_images)
    t1 = time.perf_counter()
    buffer = ShardBuffer(store, store.missing_shards())     # the writer's work left, as extraction finds it
    for i in range(0, n, batch):
        buffer.add(np.arange(i, min(i + batch, n)), feats[i:i + batch])
    t2 = time.perf_counter()
    store.mark_complete()
    store.close()
    t3 = time.perf_counter()
    return {"create_s": t1 - t0, "write_s": t2 - t1, "complete_s": t3 - t2, "shard_images": store.shard_images}


def plain_write(fs, prefix: str, feats: np.ndarray, s_img: int) -> float:
    t0 = time.perf_counter()
    for s, a in enumerate(range(0, len(feats), s_img)):
        fs.pipe_file(f"{prefix}/{s}", feats[a:a + s_img].tobytes())
    return time.perf_counter() - t0


def store_reads(url: str) -> dict:
    from chx.data.study_dataset import StudyDataset
    from chx.store import open_store

    t0 = time.perf_counter()
    store = open_store(url, require_complete=True)
    t1 = time.perf_counter()
    for s in range(store.n_shards):
        store.read_shard(s)
    t2 = time.perf_counter()
    store.close()
    ds = StudyDataset(url, "train", preload="off")
    t3 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    t4 = time.perf_counter()
    return {"open_s": t1 - t0, "shards_s": t2 - t1, "dataset_s": t4 - t3}


def plain_read(fs, prefix: str, n_objects: int, shape, dtype=np.float16) -> float:
    t0 = time.perf_counter()
    for s in range(n_objects):
        np.frombuffer(fs.cat_file(f"{prefix}/{s}"), dtype=dtype).reshape(-1, *shape)
    return time.perf_counter() - t0


def random_reads(url: str, fs, prefix: str, studies: np.ndarray, s_img: int, image_bytes: int,
                 plain_first: bool) -> tuple[float, float]:
    """(store seconds, plain seconds) reading these studies (2 images each) one by one."""
    from chx.data.study_dataset import StudyDataset

    ds = StudyDataset(url, "train", preload="off", cache_shards=0)
    ds[0]    # the store opened

    def store():
        t0 = time.perf_counter()
        for i in studies:
            ds[int(i)]
        return time.perf_counter() - t0

    def plain():
        t0 = time.perf_counter()
        for i in studies:
            row = 2 * int(i)
            s, off = divmod(row, s_img)
            fs.cat_file(f"{prefix}/{s}", start=off * image_bytes, end=(off + 2) * image_bytes)
        return time.perf_counter() - t0

    if plain_first:
        p = plain()
        return store(), p
    t = store()
    return t, plain()


def one_case(fs, shape, n: int, shard_images: int | None, repeats: int, batch: int, k_random: int, tag: str) -> dict:
    feats = (np.random.default_rng(0).standard_normal((n, *shape)) * 2).astype(np.float16)
    mb = feats.nbytes / 1e6
    image_bytes = feats[0].nbytes
    from chx.store import default_shard_images

    s_img = shard_images or default_shard_images(n, shape, "float16", False)
    reps = []
    for r in range(repeats):
        url, prefix = f"s3://{BUCKET}/{tag}-r{r}.zarr", f"{BUCKET}/plain-{tag}-r{r}"
        plain_first = r % 2 == 1
        if plain_first:
            pw = plain_write(fs, prefix, feats, s_img)
            made = make_store(url, feats, s_img, batch)
        else:
            made = make_store(url, feats, s_img, batch)
            pw = plain_write(fs, prefix, feats, s_img)
        assert made["shard_images"] == s_img
        n_obj = -(-n // s_img)
        if plain_first:
            pr = plain_read(fs, prefix, n_obj, shape)
            rd = store_reads(url)
        else:
            rd = store_reads(url)
            pr = plain_read(fs, prefix, n_obj, shape)
        studies = np.random.default_rng(r).permutation(n // 2)[:k_random]
        rs, rp = random_reads(url, fs, prefix, studies, s_img, image_bytes, plain_first)
        reps.append({**made, **rd, "plain_write_s": pw, "plain_read_s": pr, "random_store_s": rs, "random_plain_s": rp})
        fs.rm(url.removeprefix("s3://"), recursive=True)
        fs.rm(prefix, recursive=True)

    def med(key):
        return statistics.median(x[key] for x in reps)

    def ratio(a, b):   # store rate / plain rate per repetition = plain seconds / store seconds
        return statistics.median(x[b] / x[a] for x in reps)

    rand_mb = len(studies) * 2 * image_bytes / 1e6
    return {
        "shape": list(shape), "images": n, "payload_mb": round(mb, 2), "shard_images": s_img,
        "shards": -(-n // s_img), "shard_mb": round(s_img * image_bytes / 1e6, 2),
        "write_store_mb_s": mb / med("write_s"), "write_plain_mb_s": mb / med("plain_write_s"),
        "write_ratio": ratio("write_s", "plain_write_s"),
        "read_store_mb_s": mb / med("shards_s"), "read_plain_mb_s": mb / med("plain_read_s"),
        "read_ratio": ratio("shards_s", "plain_read_s"),
        "read_dataset_mb_s": mb / med("dataset_s"), "read_dataset_ratio": ratio("dataset_s", "plain_read_s"),
        "random_studies": len(studies), "random_store_mb_s": rand_mb / med("random_store_s"),
        "random_store_studies_s": len(studies) / med("random_store_s"),
        "random_plain_mb_s": rand_mb / med("random_plain_s"), "random_ratio": ratio("random_store_s", "random_plain_s"),
        "create_s": med("create_s"), "complete_s": med("complete_s"), "open_s": med("open_s"),
        "repetitions": reps,
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# Feature store on a local S3 server (moto) against plain s3fs calls\n",
           f"{res['date']}, {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, s3fs {m['s3fs']}, "
           f"zarr {m['zarr']}, moto {m['moto']}; load average {m['loadavg_start'][0]:.1f} at the start, "
           f"{m['loadavg_end'][0]:.1f} at the end; {res['seconds']:.0f} s. Command: `{res['command']}`.\n",
           f"{res['note']}\n",
           "MB/s of feature payload (10^6 bytes), medians of "
           f"{res['repeats']} repetitions; ratio = store / plain, median of the per-repetition ratios.\n",
           "| maps | images | shard (images, MB) | write store | write plain | ratio | read shards store "
           "| read plain | ratio | train-fusion reader | ratio | random study store (studies/s) | random plain "
           "| ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in res["cases"]:
        out.append(f"| {'x'.join(map(str, c['shape']))} fp16 | {c['images']} | {c['shard_images']}, {c['shard_mb']:.1f} "
                   f"| {c['write_store_mb_s']:.0f} | {c['write_plain_mb_s']:.0f} | {c['write_ratio']:.2f} "
                   f"| {c['read_store_mb_s']:.0f} | {c['read_plain_mb_s']:.0f} | {c['read_ratio']:.2f} "
                   f"| {c['read_dataset_mb_s']:.0f} | {c['read_dataset_ratio']:.2f} "
                   f"| {c['random_store_mb_s']:.0f} ({c['random_store_studies_s']:.0f}) | {c['random_plain_mb_s']:.0f} "
                   f"| {c['random_ratio']:.2f} |")
    out.append("\nOne-off store costs (seconds, medians): "
               + "; ".join(f"shard {c['shard_images']} ({'x'.join(map(str, c['shape']))}): create {c['create_s']:.2f}, "
                           f"mark complete {c['complete_s']:.2f}, open {c['open_s']:.2f}" for c in res["cases"]) + ".\n")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="768,8,8", help="C,H,W of one image's maps (swept over --shard-images)")
    ap.add_argument("--demo-shape", default="320,4,4", help="a second shape, at the store's default shard size "
                                                             "('' to skip)")
    ap.add_argument("--images", type=int, default=1024, help="images per store")
    ap.add_argument("--shard-images", default="64,128,256,512", help="shard sizes to sweep")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per ShardBuffer.add (extraction's batch)")
    ap.add_argument("--random-studies", type=int, default=64, help="studies read in random order per repetition")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--note", default="", help="a line about the machine's state for the results")
    ap.add_argument("-o", "--out", type=Path, default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    import moto
    import s3fs
    import zarr

    shape = tuple(int(x) for x in a.shape.split(","))
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": shlex.join([".venv/bin/python", "benchmarks/bench_s3.py",
                                  *(argv if argv is not None else sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "s3fs": s3fs.__version__, "zarr": zarr.__version__, "moto": moto.__version__,
                       "loadavg_start": os.getloadavg()},
           "note": a.note, "repeats": a.repeats, "cases": []}
    t0 = time.perf_counter()
    with moto_s3(BUCKET) as fs:
        for s in (int(x) for x in a.shard_images.split(",") if x):
            c = one_case(fs, shape, a.images, s, a.repeats, a.batch_size, a.random_studies, f"s{s}")
            res["cases"].append(c)
            print(f"{shape} shard {s}: write {c['write_store_mb_s']:.0f}/{c['write_plain_mb_s']:.0f} MB/s "
                  f"({c['write_ratio']:.2f}), read {c['read_store_mb_s']:.0f}/{c['read_plain_mb_s']:.0f} "
                  f"({c['read_ratio']:.2f}), reader {c['read_dataset_mb_s']:.0f} ({c['read_dataset_ratio']:.2f}), "
                  f"random {c['random_store_mb_s']:.0f}/{c['random_plain_mb_s']:.0f} ({c['random_ratio']:.2f})",
                  flush=True)
        if a.demo_shape:
            demo = tuple(int(x) for x in a.demo_shape.split(","))
            c = one_case(fs, demo, a.images, None, a.repeats, a.batch_size, a.random_studies, "demo")
            res["cases"].append(c)
            print(f"{demo} default shard {c['shard_images']}: write ratio {c['write_ratio']:.2f}, "
                  f"read ratio {c['read_ratio']:.2f}, random ratio {c['random_ratio']:.2f}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["machine"]["loadavg_end"] = os.getloadavg()
    write_results(a.out, res, markdown(res), indent=1)
    return res


if __name__ == "__main__":
    main()
