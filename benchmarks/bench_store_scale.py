"""The feature store at the paper's map size: write and cold-read rates against the disk's own, objects per image.

Builds a format-2 store of random maps (768 x 32 x 32 by default: convnext_small at 1024 px) of at
least --gib GiB through `FeatureStore.write_shard`, the path extraction uses, and measures in the
same run, on the same disk:

  write   images/s and GiB/s of writing every shard and fsync-ing every file of the store, against
          writing one plain file of the same total size in shard-sized writes, then fsync;
  read    studies/s and GiB/s of reading every shard in order (`read_shard_stored`: the stored
          bytes; float16 reads return them as they are, bfloat16/float8 are best decoded on the GPU),
          against a sequential read of the plain file; both cold: each file's pages are dropped
          first with posix_fadvise(POSIX_FADV_DONTNEED) (never a system-wide cache drop);
  verify  GiB/s of `store.verify()` (reads every shard and checks its CRC-32C), also cold, and the
          share of the write time that computing the checksums took;
  objects files in the store per image: all of them, and the map objects + done markers alone
          (target: at most 1 per 64; ~17 metadata files per store come on top), and the bytes per
          image of float16 against float8 (and float8's encode/decode cost per image).

Targets (issue 13): write >= 0.8 of raw, read >= 0.8 of raw, <= 1 object per 64 images. Use at
least 3 GiB (so that the page cache cannot hide the disk) and run it alone on the machine:

    .venv/bin/python benchmarks/bench_store_scale.py --gib 3 -o store-scale.json

`--gib 0.1` is a smoke run (seconds). Needs about twice --gib of free space under --work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chx.store import create_store, open_store, projected_size  # noqa: E402
from chx.store import _codec  # noqa: E402

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=3.0,
                    help="stored size of the maps to write, in GiB (default 3; 0.1 for a smoke run)")
    ap.add_argument("--shape", default="768,32,32", help="C,H,W of one image's map (default: the paper's 768,32,32)")
    ap.add_argument("--dtype", choices=_codec.DTYPES, default="float16",
                    help="stored dtype of the maps (default float16)")
    ap.add_argument("--flip", action="store_true", help="also store flipped maps (features_flip), as --flip does")
    ap.add_argument("--views", type=int, default=2, help="images per study (default 2: frontal + lateral)")
    ap.add_argument("--shard-images", type=int, default=None,
                    help="images per shard (default: the store's rule, ~256 MiB per shard object)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder on the disk to measure (default: a temp folder under $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the store and the raw file afterwards")
    ap.add_argument("-o", "--out", type=Path, default=None, help="write the results as JSON to this file")
    a = ap.parse_args(argv)
    if a.gib <= 0 or a.views < 1:
        ap.error("--gib must be > 0 and --views >= 1")
    return a


def drop_pages(paths) -> None:
    """Drop the page cache of these files only (their pages are clean: fsync-ed before)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(folder: Path) -> list[Path]:
    return [Path(r) / f for r, _, fs in os.walk(folder) for f in fs]


def fsync_all(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in {p.parent for p in paths}:     # the new directory entries too
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def random_maps(n: int, shape, seed: int) -> np.ndarray:
    """n random normal maps as float16, generated image by image (bounded temporary memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, *shape), dtype=np.float16)
    for i in range(n):
        out[i] = rng.standard_normal(shape, dtype=np.float32) * 2
    return out


def raw_write(path: Path, chunk: memoryview, total: int) -> float:
    """Seconds to write `total` bytes to a new plain file in writes of len(chunk), then fsync."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = total
        while left > 0:
            left -= f.write(chunk[:min(len(chunk), left)])
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def raw_read(path: Path, chunk_bytes: int) -> float:
    """Seconds to read a file sequentially into a buffer of chunk_bytes."""
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    a = parse_args(argv)
    shape = tuple(int(x) for x in a.shape.split(","))
    per_image = projected_size(1, shape, a.flip, a.dtype)
    n = max(a.views, math.ceil(a.gib * GIB / per_image))
    work = Path(tempfile.mkdtemp(prefix="chx-bench-scale-", dir=a.work))
    store_path, raw_path = work / "store.zarr", work / "raw.bin"
    print(f"store of {n:,} images x {shape} {a.dtype}{' + flip' if a.flip else ''} = {n * per_image / GIB:.2f} GiB "
          f"in {work}", flush=True)
    try:
        store = create_store(str(store_path), image_ids=[f"i{i}" for i in range(n)],
                             study_ids=[f"s{i // a.views}" for i in range(n)],
                             views=(["PA", "LATERAL", "AP", "LL", "OTHER"] * a.views)[:a.views] * (n // a.views)
                             + ["PA"] * (n % a.views), splits=["train"] * n, labels=np.zeros((n, 1)),
                             class_names=["x"], feature_shape=shape, fingerprint={"model": "bench"}, flip=a.flip,
                             dtype=a.dtype, shard_images=a.shard_images)
        S, n_shards, n_studies = store.shard_images, store.n_shards, store.n_studies
        maps = random_maps(S, shape, seed=0)
        flips = -maps if a.flip else None

        warm, warm_scale = _codec.encode(maps[:1], a.dtype)             # imports and warms torch (float8, bfloat16)
        _codec.decode(warm, a.dtype, warm_scale)

        # ---- write through write_shard (what extraction does), then fsync every file
        t0 = time.perf_counter()
        for s in range(n_shards):
            lo, hi = store.shard_rows(s)
            maps[0, 0, 0, 0] = s          # every shard differs from the last
            store.write_shard(s, maps[:hi - lo], None if flips is None else flips[:hi - lo])
        store_files = files_under(store_path)
        fsync_all(store_files)
        t_write = time.perf_counter() - t0
        store.mark_complete()
        store.close()
        info = open_store(str(store_path)).info()
        logical = info["feature_bytes_on_disk"]          # bytes of the map objects, as read back

        # ---- the disk's raw write of the same total, in shard-sized writes
        encoded, _ = _codec.encode(maps, a.dtype)
        chunk = memoryview(np.ascontiguousarray(encoded).reshape(-1).view(np.uint8))
        t_raw_write = raw_write(raw_path, chunk, logical)

        # ---- cold sequential reads: whole shards vs the plain file
        drop_pages(files_under(store_path) + [raw_path])
        with open_store(str(store_path), require_complete=True) as st:   # opened once, outside the timing
            t0 = time.perf_counter()
            for s in range(n_shards):
                st.read_shard_stored(s)    # the bytes a GPU-fed reader moves; decoding is timed below
            t_read = time.perf_counter() - t0
        drop_pages([raw_path])
        t_raw_read = raw_read(raw_path, len(chunk))

        # ---- verify (cold), and what the checksums cost at write time
        drop_pages(files_under(store_path))
        with open_store(str(store_path)) as st:
            report = st.verify()
        t0 = time.perf_counter()
        for _ in range(3):
            _codec.crc32c(encoded)
        crc_gib_s = 3 * encoded.nbytes / GIB / (time.perf_counter() - t0)
        crc_seconds = logical / GIB / crc_gib_s

        # ---- compact maps: bytes per image, and float8's CPU cost
        f8_encode_s, f8_decode_s = _float8_cost(maps[:min(S, 32)])
        files = info["files"]
        map_objects = _codec.objects_per_shard(a.dtype, a.flip) * n_shards
        result = {
            "benchmark": "store at scale", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "work": str(work)},
            "store": {"images": n, "studies": n_studies, "shape": list(shape), "dtype": a.dtype, "flip": a.flip,
                      "shard_images": S, "shards": n_shards, "gib_maps": logical / GIB,
                      "bytes_on_disk": info["bytes_on_disk"], "bytes_logical": info["bytes_logical"]},
            "write": {"seconds": t_write, "images_per_s": n / t_write, "gib_per_s": logical / GIB / t_write,
                      "raw_gib_per_s": logical / GIB / t_raw_write, "ratio_to_raw": t_raw_write / t_write,
                      "target_ratio": 0.8},
            "read_cold": {"seconds": t_read, "studies_per_s": n_studies / t_read, "images_per_s": n / t_read,
                          "gib_per_s": logical / GIB / t_read, "raw_gib_per_s": logical / GIB / t_raw_read,
                          "ratio_to_raw": t_raw_read / t_read, "target_ratio": 0.8},
            "verify_cold": {"seconds": report.seconds, "gib_per_s": report.bytes_read / GIB / report.seconds,
                            "ok": report.ok},
            "checksum": {"algorithm": "crc32c", "gib_per_s": crc_gib_s, "seconds": crc_seconds,
                         "share_of_write_time": crc_seconds / t_write},
            "objects": {"files": files, "files_per_image": files / n, "images_per_file": n / files,
                        "map_objects_per_image": map_objects / n, "metadata_files": files - map_objects,
                        "target_files_per_image": 1 / 64},
            "dtypes": {"bytes_per_image": {d: projected_size(1, shape, a.flip, d) for d in _codec.DTYPES},
                       "float8_vs_float16": projected_size(1, shape, a.flip, "float8")
                       / projected_size(1, shape, a.flip, "float16"),
                       "float8_encode_ms_per_image": f8_encode_s * 1e3,
                       "float8_decode_ms_per_image": f8_decode_s * 1e3},
        }
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    _print(result)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")
    return result


def _float8_cost(maps: np.ndarray) -> tuple[float, float]:
    """(encode, decode) seconds per image of float8, measured on these maps (in memory)."""
    t0 = time.perf_counter()
    raw, scale = _codec.encode(maps, "float8")
    t1 = time.perf_counter()
    _codec.decode(raw, "float8", scale)
    t2 = time.perf_counter()
    return (t1 - t0) / len(maps), (t2 - t1) / len(maps)


def _print(r: dict) -> None:
    w, rd, v, o, c = r["write"], r["read_cold"], r["verify_cold"], r["objects"], r["checksum"]
    st = r["store"]
    print(f"store: {st['images']:,} images, {st['studies']:,} studies, {st['gib_maps']:.2f} GiB of maps, "
          f"{st['shards']:,} shards of {st['shard_images']} images")
    print(f"write       {w['images_per_s']:8.0f} images/s  {w['gib_per_s']:6.2f} GiB/s   "
          f"raw file {w['raw_gib_per_s']:6.2f} GiB/s   ratio {w['ratio_to_raw']:.2f} (target >= 0.8)")
    print(f"read, cold  {rd['studies_per_s']:8.0f} studies/s {rd['gib_per_s']:6.2f} GiB/s   "
          f"raw file {rd['raw_gib_per_s']:6.2f} GiB/s   ratio {rd['ratio_to_raw']:.2f} (target >= 0.8)")
    print(f"verify      {v['gib_per_s']:6.2f} GiB/s cold ({'ok' if v['ok'] else 'PROBLEMS'}); "
          f"CRC-32C {c['gib_per_s']:.1f} GiB/s in memory = {100 * c['share_of_write_time']:.1f} % of the write time")
    print(f"objects     {o['files']:,} files = 1 per {o['images_per_file']:.0f} images; map objects + done markers: "
          f"1 per {1 / o['map_objects_per_image']:.0f} images (target: 1 per >= 64); the other "
          f"{o['metadata_files']} files are the store's fixed metadata")
    d = r["dtypes"]
    sizes = ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in d["bytes_per_image"].items())
    print(f"bytes/image {sizes}; float8 = {d['float8_vs_float16']:.3f} x float16; float8 encode "
          f"{d['float8_encode_ms_per_image']:.2f} ms, decode {d['float8_decode_ms_per_image']:.2f} ms per image")


if __name__ == "__main__":
    main()
