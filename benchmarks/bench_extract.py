"""Extraction throughput against the bare backbone forward (the limit), and the store's size and
read speed, for the Zarr and HDF5 backends. Same images, model, size and batch, one run.

    .venv/bin/python benchmarks/bench_extract.py [--studies 300] [--size 128] [--repeats 3]

- bare forward: ``forward_features`` over already decoded, resized tensors in memory;
- extraction: the real `extract-features` (decode in DataLoader workers, write in a thread);
- ratio = extraction images/s / bare images/s (target >= 0.9: decoding and writing hidden);
- bytes per image on disk, and whole studies read per second in random order, per backend;
- the cost breakdown behind the ratio, per image: decoding + preprocessing (one core, in the main
  process), the bare forward, and a store write of precomputed maps (features + done flag).
  On a CPU-only machine all three share the same cores, so the ratio cannot approach 1 there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import backbone_checkpoint, demo_data, median  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)

    from chx.data.datasets import ImageDataset
    from chx.data.manifest import read_manifest
    from chx.data.transforms import Preprocess
    from chx.pipeline.extract import extract_features
    from chx.engine.inference import load_backbone
    from chx.store import open_store

    work = a.work or Path(tempfile.mkdtemp(prefix="chx-bench-"))
    manifest = demo_data(work, a.studies, a.size)
    images = manifest.parent / "images"
    ckpt = backbone_checkpoint(work, a.model, a.size)
    model, meta = load_backbone(ckpt)
    df = read_manifest(manifest)
    n = df.height
    ds = ImageDataset(df, images, Preprocess.from_dict(meta["preprocess"]))
    decode = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        x = torch.stack([ds[i]["image"] for i in range(n)])
        decode.append((time.perf_counter() - t0) / n)

    bare = []
    with torch.no_grad():
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            feats = [model.forward_features(x[i:i + a.batch_size]).to(torch.float16).numpy()
                     for i in range(0, n, a.batch_size)]
            bare.append(n / (time.perf_counter() - t0))

    rows = []
    speeds = {}
    write_cost = {}
    for backend, name in (("zarr", "f.zarr"), ("hdf5", "f.h5")):
        runs = []
        for _ in range(a.repeats):
            store = work / name
            shutil.rmtree(store, ignore_errors=True) if store.is_dir() else store.unlink(missing_ok=True)
            r = extract_features(ckpt, manifest, images, str(store), batch_size=a.batch_size,
                                 workers=a.workers, echo=lambda *_: None)
            runs.append(r.images_per_s)
        speeds[backend] = median(runs)
        with open_store(store) as s:
            info = s.info()
            order = np.random.default_rng(0).permutation(s.n_studies)
            t0 = time.perf_counter()
            for i in order:
                s.read_study(int(i))
            read = s.n_studies / (time.perf_counter() - t0)
        rows.append((backend, info["bytes_on_disk"] / n, info["compression_ratio"], read))
        write_cost[backend] = median([_write_only(work / f"w-{name}", s_path=store, feats=feats,
                                                  batch=a.batch_size) for _ in range(a.repeats)])

    b = median(bare)
    print(f"{a.model} at {a.size} px, batch {a.batch_size}, {n} images, {a.workers} decode worker(s), "
          f"median of {a.repeats}:")
    print(f"  bare forward       {b:8.1f} images/s")
    for backend in speeds:
        print(f"  extraction ({backend:<4}) {speeds[backend]:8.1f} images/s   ratio {speeds[backend] / b:.2f}")
    for backend, bpi, ratio, read in rows:
        print(f"  store {backend:<4}  {bpi / 1024:7.1f} KiB/image on disk (compression {ratio:.2f})  "
              f"{read:8.0f} studies/s random-order reads")
    print(f"  cost per image: decode + preprocess {1e3 * median(decode):.2f} ms (1 core), bare forward "
          f"{1e3 / b:.2f} ms (all cores), store write " +
          ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in write_cost.items()))
    return [{"benchmark": f"extraction / bare forward ({k})", "value": f"{v / b:.2f}",
             "detail": f"{v:.1f} vs {b:.1f} images/s", "target": ">= 0.9"} for k, v in speeds.items()] + \
           [{"benchmark": f"store {k}: size, random reads", "value": f"{bpi / 1024:.1f} KiB/image",
             "detail": f"{read:.0f} studies/s, compression {ratio:.2f}", "target": ""} for k, bpi, ratio, read in rows]


def _write_only(path: Path, s_path: Path, feats: list, batch: int) -> float:
    """Seconds per image to write precomputed maps into a fresh copy of a store's layout, through the
    same whole-shard path as extraction (ShardBuffer -> write_shard, done markers with checksums)."""
    from chx.store import ShardBuffer, create_store, open_store

    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    with open_store(s_path) as src:
        study_of_row = np.repeat(np.arange(src.n_studies), np.diff(src.study_ptr))
        layout = dict(image_ids=src.image_ids, study_ids=[src.study_ids[i] for i in study_of_row],
                      views=src.views, splits=src.splits, labels=src.labels[study_of_row],
                      class_names=src.class_names, feature_shape=src.feature_shape, fingerprint=src.fingerprint)
    store = create_store(str(path), **layout)
    n = len(layout["image_ids"])
    buffer = ShardBuffer(store, np.arange(store.n_shards))
    t0 = time.perf_counter()
    for k, i in enumerate(range(0, n, batch)):
        buffer.add(np.arange(i, min(i + batch, n)), feats[k])
    return (time.perf_counter() - t0) / n


if __name__ == "__main__":
    main()
