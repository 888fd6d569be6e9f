"""Cold read throughput of the stage-2 reader on an existing feature store (studies/s, GiB/s).

The default reader (whole shards, shard-local shuffle) against random access, with a raw
sequential read of the store's files as the ceiling.

    .venv/bin/python benchmarks/bench_reader.py STORE [--split train] [--workers 0] [--batch-size 16]
        [--buffer-shards 4] [--max-studies N] [--modes shards,random,raw] [-o reader.json]

Modes, each timed over one pass (an epoch, or the first --max-studies studies of it):
- shards: StudyDataset streaming with its shard cache (buffer_shards + 1 shards per worker) in the
  order of ShardShuffleSampler(buffer_shards, lanes=workers): what train-fusion reads with
  --preload off;
- random: the same dataset with cache_shards=0 (one read per study) in a ShuffleSampler order;
- raw: every file of the store read sequentially (8 MiB reads), the disk's ceiling for these bytes.
Items are built as in training (train=True: seeded view subsets, flipped maps when the store has
them) and batched with collate_studies, with no model. Each mode starts cold: the store's pages
are dropped from the page cache with os.posix_fadvise(..., POSIX_FADV_DONTNEED) on each of its
files (after an fsync), never a system-wide drop. Two rates: "delivered" counts one float16 copy
of every image of the studies served (what training consumes); "read" counts the bytes the reader
took from the store (the shard reader also reads the other splits' rows inside a shard's span and,
in training with flipped maps, both copies of each shard). "vs raw" compares the read rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from chx.errors import ChxError

MODES = ("shards", "random", "raw")


def store_files(path: Path) -> list[Path]:
    """The store's files: the .h5 file itself, or every file under the Zarr directory (sorted)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def drop_pages(files: list[Path]) -> None:
    """Evict these files' pages from the page cache (dirty pages are written first, so they go too)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> dict:
    buf = bytearray(8 * 2**20)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": total, "gib_per_s": total / 2**30 / seconds}


@contextlib.contextmanager
def counted_reads():
    """Within the block, every process (forked DataLoader workers too) adds the bytes the store's
    row reader (``FeatureStore.read_rows``, what the dataset reads with) returns to one shared
    counter, which the block gets."""
    import multiprocessing

    from chx.store import FeatureStore

    counter = multiprocessing.get_context("fork").Value("q", 0)
    read = FeatureStore.read_rows

    def counting(store, start, stop, flip=False):
        maps = read(store, start, stop, flip)
        with counter.get_lock():
            counter.value += maps.nbytes
        return maps

    FeatureStore.read_rows = counting
    try:
        yield counter
    finally:
        FeatureStore.read_rows = read


def reader_pass(args, mode: str) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from chx.data.samplers import ShardShuffleSampler, ShuffleSampler
    from chx.data.study_dataset import StudyDataset, collate_studies

    buffer = args.buffer_shards
    ds = StudyDataset(args.store, args.split, max_views=args.max_views, train=True,
                      cache_shards=buffer + 1 if mode == "shards" else 0)
    if len(ds) == 0:
        raise SystemExit(f"{args.store} has no studies in split {args.split!r}")
    if mode == "shards":
        sampler = ShardShuffleSampler(ds.item_shards, buffer, lanes=max(1, args.workers),
                                      batch_size=args.batch_size, seed=0)
    else:
        sampler = ShuffleSampler(len(ds), seed=0)
    c, h, w = ds.store.feature_shape
    map_bytes = c * h * w * 2
    views_of = np.diff(ds.row_ptr)
    limit = args.max_studies or len(ds)
    studies = images = 0
    first = None     # (seconds, studies) at the first batch: worker start-up, first reads
    with counted_reads() as counter, torch.no_grad():
        loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            collate_fn=collate_studies, multiprocessing_context="fork" if args.workers else None)
        t0 = time.perf_counter()
        for batch in loader:
            studies += len(batch["ids"])
            images += int(views_of[batch["index"].numpy()].sum())
            first = first or (time.perf_counter() - t0, studies)
            if studies >= limit:
                break
        seconds = time.perf_counter() - t0
        del loader   # stops the workers, so that the counter holds all their reads
    steady = (studies - first[1]) / (seconds - first[0]) if studies > first[1] else None
    return {"studies": studies, "images": images, "seconds": seconds, "studies_per_s": studies / seconds,
            "delivered_gib_per_s": images * map_bytes / 2**30 / seconds,
            "read_gib": counter.value / 2**30, "gib_per_s": counter.value / 2**30 / seconds,
            "first_batch_s": first[0], "studies_per_s_after_first_batch": steady,
            "shards": int(len(np.unique(ds.item_shards)))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path, help="an existing, complete feature store (Zarr directory or .h5 file)")
    ap.add_argument("--split", default="train", help="the split whose studies are read (default: train)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    ap.add_argument("--batch-size", type=int, default=16, help="studies per batch (default: 16)")
    ap.add_argument("--max-views", type=int, default=4, help="views kept per study (default: 4)")
    ap.add_argument("--buffer-shards", type=int, default=4,
                    help="shards shuffled together by the default reader (default: 4)")
    ap.add_argument("--max-studies", type=int, default=None,
                    help="stop each mode after this many studies (default: one whole epoch)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("-o", "--output", type=Path, default=None, help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    if not args.store.exists():
        ap.error(f"{args.store} does not exist")
    args.store = str(args.store)
    files = store_files(Path(args.store))
    result = {"store": args.store, "split": args.split, "workers": args.workers, "batch_size": args.batch_size,
              "buffer_shards": args.buffer_shards, "files": len(files),
              "store_bytes": sum(p.stat().st_size for p in files), "modes": {}}
    for mode in modes:
        drop_pages(files)
        try:
            result["modes"][mode] = raw_read(files) if mode == "raw" else reader_pass(args, mode)
        except ChxError as e:    # not a usable store: one line, no traceback
            raise SystemExit(f"error: {e}") from None
    runs = result["modes"]
    print(f"{args.store}: {len(files):,} files, {result['store_bytes'] / 2**30:.2f} GiB; split "
          f"{args.split}, {args.workers} worker(s), batch {args.batch_size}, cold")
    for mode, r in runs.items():
        if mode == "raw":
            print(f"  {mode:<7} {'':>38} read {r['gib_per_s']:7.3f} GiB/s  ({r['seconds']:.2f} s)")
            continue
        print(f"  {mode:<7} {r['studies_per_s']:9.1f} studies/s  delivered {r['delivered_gib_per_s']:7.3f} GiB/s  "
              f"read {r['gib_per_s']:7.3f} GiB/s  ({r['read_gib']:.2f} GiB in {r['seconds']:.2f} s, "
              f"first batch {r['first_batch_s']:.2f} s)")
    if "raw" in runs:
        for mode in ("shards", "random"):
            if mode in runs:
                runs[mode]["vs_raw"] = runs[mode]["gib_per_s"] / runs["raw"]["gib_per_s"]
                print(f"  {mode} / raw: {runs[mode]['vs_raw']:.2f}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
