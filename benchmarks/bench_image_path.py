"""Images/s delivered to stage 1 (read + preprocess + augment), per core: from MIMIC-size JPEGs with
draft mode, from the image cache (`chx cache-images`), and from the cache with the augmentation on
the device (`--augment-on device`: the worker only reads), at 512 and 1,024 px.

The test images are made from a real X-ray: the SIIM CR DICOM of ../shared/data/dicom (1,024 px,
real anatomy), resized to MIMIC-CXR-JPG's size (2,544 x 3,056), with a little film grain so that no
two files are alike, saved as 8-bit JPEG quality 95 (MIMIC-CXR-JPG's size and quality).

One core: one process, one torch thread, items read in a loop as a DataLoader worker reads them
(`ImageDataset[(index, seed)]`); the median of --repeats passes. `--loader-workers K` also measures a
DataLoader with K workers (what a machine with K cores feeds the model).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_image_path.py -o benchmarks/results/bench_image_path
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "dicom" / "siim_pneumothorax_sample.dcm"
MODES = ("jpeg", "cache", "cache+device")


def _one_jpeg(args) -> str:
    src, path, height, width, quality, seed = args
    from PIL import Image

    base = np.asarray(Image.fromarray(src).resize((width, height), Image.BICUBIC), dtype=np.float32)
    grain = np.random.default_rng(seed).normal(0.0, 3.0, base.shape).astype(np.float32)
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(path, quality=quality)
    return str(path)


def xray_pixels(source: Path) -> np.ndarray:
    """uint8 [H, W] of a real X-ray (a DICOM through pydicom, any other file through PIL)."""
    if source.suffix.lower() == ".dcm":
        import pydicom

        px = pydicom.dcmread(source).pixel_array.astype(np.float32)
    else:
        from PIL import Image

        px = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
    px = (px - px.min()) / max(float(px.max() - px.min()), 1e-6) * 255
    return px.astype(np.uint8)


def mimic_jpegs(source: Path, folder: Path, n: int, height: int = 3056, width: int = 2544, quality: int = 95,
                procs: int = 1) -> list[Path]:
    """``n`` distinct MIMIC-size JPEGs made from the real X-ray ``source`` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = xray_pixels(source)
    jobs = [(src, folder / f"xray{i:04d}.jpg", height, width, quality, i) for i in range(n)]
    if procs > 1:
        with Pool(procs) as pool:
            return [Path(p) for p in pool.map(_one_jpeg, jobs)]
    return [Path(_one_jpeg(j)) for j in jobs]


def write_manifest(folder: Path, files: list[Path], rows: int, seed: int = 0) -> Path:
    """A chx manifest of ``rows`` images (the files repeated as needed), two views per study, every row
    in the training split, two findings at ~30 % prevalence."""
    import polars as pl

    rng = np.random.default_rng(seed)
    n = rows // 2 * 2
    studies = [f"s{i // 2:05d}" for i in range(n)]
    df = pl.DataFrame({
        "image_id": [f"img{i:05d}" for i in range(n)], "study_id": studies,
        "subject_id": [f"p{i // 2:05d}" for i in range(n)],
        "view": ["PA" if i % 2 == 0 else "LATERAL" for i in range(n)],
        "path": [files[i % len(files)].name for i in range(n)], "split": ["train"] * n,
        # labels are per study: both views of a study carry its labels
        "Finding A": np.repeat(rng.random(n // 2) < 0.3, 2).astype(np.float32),
        "Finding B": np.repeat(rng.random(n // 2) < 0.3, 2).astype(np.float32),
    })
    path = folder / f"manifest-{n}.parquet"
    df.write_parquet(path)
    return path


def build_cache(manifest: Path, images: Path, out: Path, size: int, workers: int) -> float:
    """Fill an image cache at ``size`` px; its images/s."""
    from chx.options import CacheImagesOptions
    from chx.pipeline.cache_images import cache_images

    r = cache_images(CacheImagesOptions(manifest=manifest, images=images, out=out, size=size, workers=workers,
                                        overwrite=True), images, echo=lambda *_: None)
    return r.images_per_s


def dataset(mode: str, manifest: Path, images: Path, cache_path: Path | None, size: int):
    import polars as pl

    from chx.data.datasets import ImageDataset
    from chx.data.image_cache import open_image_cache
    from chx.data.transforms import Preprocess

    pre = Preprocess(size=size)
    cache = open_image_cache(cache_path, pre) if mode != "jpeg" else None
    return ImageDataset(pl.read_parquet(manifest), images, pre, train=True, cache=cache,
                        device_augment=mode == "cache+device")


def per_core(ds, n: int, repeats: int) -> float:
    """Images/s of one process on one thread reading items (index, seed) as a worker does."""
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            ds[(i % len(ds), 1000 * r + i)]
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def loader_rate(ds, workers: int, batch: int, batches: int) -> float:
    """Images/s a DataLoader with ``workers`` workers delivers in steady state. The first ``workers``
    batches are not timed: every worker starts its first batch at once, so they arrive together and a
    window that begins with them counts work done before it (GPU run 1 reported 1,500-2,200 images/s
    that way). ``batches`` (at least 2 x workers) are timed after them."""
    from torch.utils.data import DataLoader

    from chx.workers import batches as closing_batches, worker_init

    batches = max(batches, 2 * workers)
    idx = [(i % len(ds), i) for i in range(batch * (batches + workers))]
    loader = DataLoader(ds, batch_size=batch, sampler=idx, num_workers=workers, worker_init_fn=worker_init)
    t0, seen, k = None, 0, 0
    with closing_batches(loader) as it:
        for b in it:
            k += 1
            if k == max(workers, 1):
                t0 = time.perf_counter()
            elif t0 is not None:
                seen += len(b["image"])
    return seen / (time.perf_counter() - t0)


def device_augment_rate(size: int, batch: int, device: str, repeats: int = 3) -> float:
    """Images/s of BatchAugment (the stage-1 augmentations, batched) on ``device``."""
    from chx.data.batch_augment import BatchAugment
    from chx.data.transforms import Preprocess

    aug = BatchAugment(Preprocess(size=size))
    x = torch.rand(batch, 1, size, size, device=device)
    rates = []
    for r in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        aug(x, list(range(r * batch, (r + 1) * batch)))
        if device == "cuda":
            torch.cuda.synchronize()
        if r:      # the first pass warms up
            rates.append(batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def run(work: Path, sizes: list[int], files: int, n: int, repeats: int, loader_workers: int, source: Path,
        procs: int = 1, echo=print) -> dict:
    images = work / "images"
    paths = mimic_jpegs(source, images, files, procs=procs)
    manifest = write_manifest(work, paths, max(n, files))
    out = {"source": str(source), "files": files, "items": n, "repeats": repeats,
           "jpeg_bytes_mean": float(np.mean([p.stat().st_size for p in paths])), "sizes": {}}
    for size in sizes:
        cache = work / f"cache-{size}"
        res = {"cache_build_images_per_s": build_cache(manifest, images, cache, size, workers=0)}
        torch.set_num_threads(1)
        for mode in MODES:
            res[f"{mode}_per_core"] = per_core(dataset(mode, manifest, images, cache, size), n, repeats)
        res["cache_vs_jpeg"] = res["cache_per_core"] / res["jpeg_per_core"]
        res["cache+device_vs_jpeg"] = res["cache+device_per_core"] / res["jpeg_per_core"]
        res["batch_augment_cpu_1thread"] = device_augment_rate(size, 8, "cpu")
        if loader_workers:
            for mode in MODES:
                res[f"{mode}_loader_{loader_workers}w"] = loader_rate(
                    dataset(mode, manifest, images, cache, size), loader_workers, 32, 8)
        out["sizes"][size] = res
        echo(f"{size} px: " + ", ".join(f"{k} {v:,.1f}" for k, v in res.items()))
    return out


def markdown(r: dict) -> str:
    lines = ["| size | JPEG (draft) img/s/core | cache img/s/core | cache + device aug img/s/core | cache/JPEG | "
             "cache+device/JPEG |", "| --- | --- | --- | --- | --- | --- |"]
    for size, s in r["sizes"].items():
        lines.append(f"| {size} | {s['jpeg_per_core']:.1f} | {s['cache_per_core']:.1f} | "
                     f"{s['cache+device_per_core']:.1f} | {s['cache_vs_jpeg']:.1f}x | {s['cache+device_vs_jpeg']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,1024", help="model input sizes (comma-separated)")
    ap.add_argument("--files", type=int, default=16, help="distinct MIMIC-size JPEGs made")
    ap.add_argument("--n", type=int, default=32, help="items read per pass")
    ap.add_argument("--repeats", type=int, default=3, help="passes per mode (the median is reported)")
    ap.add_argument("--loader-workers", type=int, default=0, help="also time a DataLoader with this many workers")
    ap.add_argument("--source", type=Path, default=SOURCE, help="the real X-ray the test images are made from")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    if not a.source.is_file():
        sys.exit(f"error: {a.source} not found; give --source (a real X-ray: DICOM, PNG or JPEG)")
    work = a.work or Path(tempfile.mkdtemp(prefix="chx-imgpath-"))
    r = run(work, [int(s) for s in a.sizes.split(",")], a.files, a.n, a.repeats, a.loader_workers, a.source,
            procs=min(a.files, os.cpu_count() or 1))
    r.update(date=time.strftime("%Y-%m-%d"), threads=torch.get_num_threads(), cpu=os.cpu_count(),
             command="OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_image_path.py " + " ".join(argv or sys.argv[1:]))
    print(markdown(r))
    write_results(a.out, r, markdown(r))
    return r


if __name__ == "__main__":
    main()
