"""GPU figures at the paper's configuration (convnext_small, 1,024 px, bf16, channels_last): what each
stage runs at on one GPU, from the bare model up to chx's own pipeline, and which resource binds it.

Phases (each one's figures are saved as soon as it ends; a failed phase is recorded and the next runs):
  peak      bf16 matrix product 8192^3: the measured ceiling beside the datasheet's
  stage1    one training step on tensors already on the GPU (batch 8, the paper's, and 32), images/s,
            TFLOP/s, fraction of peak, peak memory, the largest batch that fits; cudnn.benchmark on/off
  extract   the bare forward_features, images/s against peak
  data      MIMIC-size JPEGs made from a real X-ray; the image cache built; what a DataLoader with
            one worker per core delivers (JPEG, cache, cache with device augmentation) at 512 and 1,024
  augment   BatchAugment (--augment-on device) on the GPU, images/s
  train     chx's train_backbone end to end from the JPEGs, from the cache, from the cache with device
            augmentation (steady-state images/s from metrics.jsonl), peak memory
  pipeline  chx's extract_features end to end from the JPEGs and from the cache (float16, float8),
            against the bare forward
  fusion    chx's train_fusion from those stores (float16, float8; streamed and GPU-preloaded),
            studies/s, against recomputing the features
  disk      the store's write ceiling and cold read GiB/s on this machine's disk (bench_store_scale)

Random weights (speed does not depend on them); no network. `--smoke` runs every phase on the CPU with
a tiny model, to check the script. Run through benchmarks/gpu.sh.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Dense bf16 tensor-core peaks (TFLOP/s, datasheet) by device name; --peak-tflops overrides.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
PHASES = ("peak", "stage1", "extract", "data", "augment", "train", "pipeline", "fusion", "disk")


def flops_per_call(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def steady_rate(run_dir: Path, items_per_step: int, skip: int) -> dict:
    """Items/s between the train records of metrics.jsonl after the first ``skip`` steps."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "train" and r.get("elapsed_s") is not None]
    a = next(r for r in recs if r["step"] >= skip)
    b = recs[-1]
    return {"items_per_s": (b["step"] - a["step"]) * items_per_step / (b["elapsed_s"] - a["elapsed_s"]),
            "steps_timed": b["step"] - a["step"]}


class Bench:
    def __init__(self, a):
        self.a = a
        self.device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
        self.amp = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.name = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        self.peak = a.peak_tflops or next((v for k, v in PEAKS.items() if k in self.name), None)
        self.work = Path(a.work or tempfile.mkdtemp(prefix="chx-gpu-"))
        self.r = {"device": self.name, "model": a.model, "size": a.size, "datasheet_peak_tflops": self.peak,
                  "torch": torch.__version__, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime()),
                  "phases": {}, "errors": {}}
        import timm
        self.r["timm"] = timm.__version__
        if self.device.type == "cuda":
            self.r["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30

    def save(self):
        self.a.out.write_text(json.dumps(self.r, indent=2))

    def phase(self, name, fn):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            res = fn()
            res["phase_wall_s"] = time.perf_counter() - t0
            self.r["phases"][name] = res
            for k, v in res.items():
                print(f"   {k:<44} {v:,.3f}" if isinstance(v, float) else f"   {k:<44} {v}", flush=True)
        except Exception as e:       # record it, go on to the next phase
            self.r["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            reset_memory(self.device)
            self.save()

    # ---- phases ---------------------------------------------------------------------------------
    def peak_matmul(self):
        n = 8192 if self.device.type == "cuda" else 256
        x = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        s = timed(lambda: x @ x, 3, 10, self.device)
        return {"matmul_bf16_tflops": 2 * n ** 3 / s / 1e12}

    def stage1(self):
        from chx.losses import weighted_asl
        from chx.models.backbone import ImageClassifier
        from chx.engine.inference import images_to, model_to

        a, dev = self.a, self.device
        out = {}
        model = model_to(ImageClassifier(a.model, a.classes), dev)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
        prior = torch.full((a.classes,), 0.1, device=dev)

        def step_fn(b):
            x = images_to(torch.randn(b, 1, a.size, a.size, device=dev), dev)
            y = (torch.rand(b, a.classes, device=dev) < 0.1).float()

            def step():
                with torch.autocast(**self.amp):
                    loss = weighted_asl(model(x), y, prior)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step

        one = images_to(torch.randn(1, 1, a.size, a.size, device=dev), dev)
        fwd = flops_per_call(lambda: model(one))
        out["forward_gflop_per_image"] = fwd / 1e9
        mems = {}
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            for b in a.batches:
                reset_memory(dev)
                s = timed(step_fn(b), 3, a.iters, dev)
                tag = f"b{b}{'_cudnn_benchmark' if bench else ''}"
                out[f"train_{tag}_images_per_s"] = b / s
                out[f"train_{tag}_tflops"] = 3 * fwd * b / s / 1e12
                if self.peak:
                    out[f"train_{tag}_mfu"] = out[f"train_{tag}_tflops"] / self.peak
                if dev.type == "cuda" and not bench:
                    mems[b] = torch.cuda.max_memory_allocated() / 2**30
                    out[f"train_b{b}_peak_gib"] = mems[b]
        torch.backends.cudnn.benchmark = False
        if len(mems) >= 2:          # peak = fixed + per-image * b: the largest batch that fits, then tried
            (b1, m1), (b2, m2) = sorted(mems.items())[:2]
            per = (m2 - m1) / (b2 - b1)
            total = self.r["gpu_memory_gib"]
            est = int((0.95 * total - (m1 - per * b1)) / per)
            out["train_gib_per_image"] = per
            out["train_largest_batch_estimate"] = est
            try:
                reset_memory(dev)
                timed(step_fn(est), 0, 1, dev)
                out["train_largest_batch_tried_ok"] = est
                out["train_largest_batch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                out["train_largest_batch_tried_ok"] = 0
        model.set_grad_checkpointing(True)        # --grad-checkpointing: memory per image
        reset_memory(dev)
        s = timed(step_fn(a.batches[-1]), 2, a.iters, dev)
        out[f"train_b{a.batches[-1]}_gradckpt_images_per_s"] = a.batches[-1] / s
        if dev.type == "cuda":
            out[f"train_b{a.batches[-1]}_gradckpt_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    def extract_bare(self):
        from chx.models.backbone import ImageClassifier
        from chx.engine.inference import images_to, model_to

        a, dev = self.a, self.device
        model = model_to(ImageClassifier(a.model, a.classes), dev).eval()
        x = images_to(torch.randn(a.batches[-1], 1, a.size, a.size, device=dev), dev)
        out = {}
        with torch.no_grad():
            flops = flops_per_call(lambda: model.forward_features(x[:1]))

            def step():
                with torch.autocast(**self.amp):
                    model.forward_features(x).to(torch.float16)
            s = timed(step, 2, a.iters, dev)
        out["extract_bare_images_per_s"] = x.shape[0] / s
        out["extract_bare_tflops"] = flops * x.shape[0] / s / 1e12
        if self.peak:
            out["extract_bare_mfu"] = out["extract_bare_tflops"] / self.peak
        out["extract_bare_peak_gib"] = peak_gib(dev)
        self.bare_extract = out["extract_bare_images_per_s"]
        return out

    def data(self):
        import bench_image_path as bip

        a = self.a
        procs = os.cpu_count() or 1
        t0 = time.perf_counter()
        files = bip.mimic_jpegs(a.source, self.work / "images", a.files, procs=procs,
                                height=a.jpeg_height, width=a.jpeg_width)
        out = {"jpegs_made": len(files), "jpegs_wall_s": time.perf_counter() - t0,
               "jpeg_mib_mean": sum(f.stat().st_size for f in files) / len(files) / 2**20}
        self.manifest = bip.write_manifest(self.work, files, a.rows)
        self.images = self.work / "images"
        self.caches = {}
        workers = max(1, procs)
        for size in a.data_sizes:
            cache = self.work / f"cache-{size}"
            out[f"cache_build_{size}_images_per_s_{workers}w"] = bip.build_cache(self.manifest, self.images, cache,
                                                                                 size, workers)
            self.caches[size] = cache
            for mode in bip.MODES:
                ds = bip.dataset(mode, self.manifest, self.images, cache, size)
                out[f"loader_{size}_{mode}_images_per_s_{workers}w"] = bip.loader_rate(ds, workers, 32, a.loader_batches)
        out["workers"] = workers
        return out

    def augment(self):
        import bench_image_path as bip

        dev = self.device.type
        return {f"batch_augment_{s}_{dev}_images_per_s": bip.device_augment_rate(s, 32, dev) for s in self.a.data_sizes}

    def train(self):
        from chx.options import BackboneOptions, TrainConfig
        from chx.pipeline.train_backbone import train_backbone

        a = self.a
        out = {}
        b = a.batches[-1]
        for name, cache, on in (("jpeg", None, "workers"), ("cache", self.caches[a.size], "workers"),
                                ("cache_device_aug", self.caches[a.size], "device")):
            reset_memory(self.device)
            run = self.work / f"train-{name}"
            cfg = TrainConfig(epochs=100, batch_size=b, workers=os.cpu_count() or 1, max_steps=a.train_steps,
                              log_every=a.log_every, device=self.device.type, val_every=1000, progress_every=1e9)
            opts = BackboneOptions(model=a.model, size=a.size, pretrained=False, tta=False, augment_on=on)
            t0 = time.perf_counter()
            train_backbone([self.manifest], [self.images], run, opts, cfg, overwrite=True,
                           images_cache=str(cache) if cache else None)
            r = steady_rate(run, b, a.log_every)
            out[f"train_{name}_images_per_s"] = r["items_per_s"]
            out[f"train_{name}_steps_timed"] = r["steps_timed"]
            out[f"train_{name}_wall_s"] = time.perf_counter() - t0
            out[f"train_{name}_peak_gib"] = peak_gib(self.device)
        self.checkpoint = self.work / "train-cache" / "last.pt"
        return out

    def random_checkpoint(self) -> Path:
        """A stage-1 checkpoint with random weights for the manifest's classes (bench_image_path's)."""
        import polars as pl

        from chx.data.manifest import class_columns
        from chx.data.transforms import Preprocess
        from chx.models import save_checkpoint
        from chx.models.backbone import ImageClassifier

        classes = class_columns(pl.read_parquet(self.manifest))
        net = ImageClassifier(self.a.model, num_classes=len(classes))
        path = self.work / "random-backbone.pt"
        save_checkpoint({"kind": "backbone", "model_config": net.config, "state_dict": net.state_dict(),
                         "class_names": classes, "preprocess": Preprocess(self.a.size).to_dict(),
                         "train_counts": [1] * len(classes), "tta": False}, path)
        return path

    def pipeline(self):
        from chx.pipeline.extract import extract_features

        a = self.a
        out = {}
        self.stores = {}
        if getattr(self, "checkpoint", None) is None:      # the train phase was not run: random weights
            self.checkpoint = self.random_checkpoint()
        cached = self.caches[a.size]
        for name, cache, dtype, precision in (("jpeg_float16", None, "float16", "auto"),
                                              ("cache_float16", cached, "float16", "auto"),
                                              ("cache_float8", cached, "float8", "auto"),
                                              ("cache_float16_fp32", cached, "float16", "fp32")):
            reset_memory(self.device)
            store = self.work / f"{name}.zarr"
            r = extract_features(self.checkpoint, self.manifest, self.images, str(store), echo=lambda *_: None,
                                 images_cache=str(cache) if cache else None, batch_size=a.batches[-1],
                                 workers=os.cpu_count() or 1, device=self.device.type, dtype=dtype,
                                 precision=precision, overwrite=True)
            out[f"extract_{name}_images_per_s"] = r.images_per_s
            if getattr(self, "bare_extract", None):
                out[f"extract_{name}_vs_bare"] = r.images_per_s / self.bare_extract
            out[f"extract_{name}_peak_gib"] = peak_gib(self.device)
            out[f"store_{name}_mib"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
            if precision == "auto":
                self.stores[dtype] = store
        return out

    def fusion(self):
        from chx.options import FusionOptions, TrainConfig
        from chx.pipeline.train_fusion import train_fusion

        a = self.a
        out = {}
        runs = [(dtype, preload, 2) for dtype in ("float16", "float8")
                for preload in (("off", "gpu") if self.device.type == "cuda" else ("off", "ram"))]
        runs += [(dtype, "off", w) for w in a.fusion_workers if w != 2 for dtype in ("float16", "float8")]
        for dtype, preload, workers in runs:
            reset_memory(self.device)
            run = self.work / f"fusion-{dtype}-{preload}-{workers}"
            cfg = TrainConfig(epochs=1000, batch_size=8, workers=workers, max_steps=a.fusion_steps,
                              log_every=a.log_every, device=self.device.type, val_every=1000, progress_every=1e9)
            t0 = time.perf_counter()
            train_fusion(str(self.stores[dtype]), run, FusionOptions(preload=preload), cfg, overwrite=True)
            r = steady_rate(run, 8, 2 * a.log_every)
            tag = f"fusion_{dtype}_{preload}" + (f"_{workers}w" if workers != 2 else "")
            out[f"{tag}_studies_per_s"] = r["items_per_s"]
            out[f"{tag}_wall_s"] = time.perf_counter() - t0
            out[f"{tag}_peak_gib"] = peak_gib(self.device)
        # Recomputing the maps instead: the fusion step (its GPU-preloaded rate: no reading) plus 2 backbone
        # forwards per study (this manifest's 2 views) at the bare bf16 rate
        bare = getattr(self, "bare_extract", None)
        if bare:
            held = "gpu" if self.device.type == "cuda" else "ram"
            recompute = 1 / (1 / out[f"fusion_float16_{held}_studies_per_s"] + 2 / bare)
            out["fusion_recompute_studies_per_s"] = recompute
            for k in [k for k in out if k.endswith("_studies_per_s") and "recompute" not in k]:
                out[k.replace("_studies_per_s", "_vs_recompute")] = out[k] / recompute
        return out

    def disk(self):
        import bench_store_scale

        (self.work / "disk").mkdir(exist_ok=True)
        r = bench_store_scale.main(["--gib", str(self.a.disk_gib), "--work", str(self.work / "disk")])
        return {f"{part}_{k}": v for part in ("write", "read_cold", "verify_cold", "checksum")
                for k, v in r[part].items() if isinstance(v, (int, float))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_small.fb_in22k_ft_in1k")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batches", default="8,32", help="stage-1 batch sizes timed (the paper's 8, and 32)")
    ap.add_argument("--classes", type=int, default=26)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--files", type=int, default=128, help="distinct MIMIC-size JPEGs made")
    ap.add_argument("--rows", type=int, default=1024, help="manifest rows (the JPEGs repeated), 2 views per study")
    ap.add_argument("--jpeg-height", type=int, default=3056)
    ap.add_argument("--jpeg-width", type=int, default=2544)
    ap.add_argument("--data-sizes", default="512,1024")
    ap.add_argument("--loader-batches", type=int, default=48, help="batches timed per loader (>= 2 x workers)")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--fusion-steps", type=int, default=80)
    ap.add_argument("--fusion-workers", default="2", help="DataLoader workers of the streamed fusion runs")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--disk-gib", type=float, default=2.0)
    ap.add_argument("--source", type=Path, default=None, help="the real X-ray the JPEGs are made from")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every phase, to check the script")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.size, a.batches, a.iters, a.files, a.rows = "test_convnext", 64, "2,4", 1, 4, 16
        a.jpeg_height, a.jpeg_width, a.data_sizes, a.loader_batches = 306, 254, "32,64", 2
        a.train_steps, a.fusion_steps, a.log_every, a.disk_gib = 6, 8, 2, 0.02
    a.batches = [int(b) for b in a.batches.split(",")]
    a.data_sizes = [int(s) for s in a.data_sizes.split(",")]
    a.fusion_workers = [int(w) for w in a.fusion_workers.split(",")]
    if a.source is None:
        import bench_image_path
        a.source = next((p for p in (Path(".gpu/xray.dcm"), bench_image_path.SOURCE) if p.is_file()),
                        bench_image_path.SOURCE)
    bench = Bench(a)
    print(json.dumps({k: v for k, v in bench.r.items() if k not in ("phases", "errors")}), flush=True)
    steps = {"peak": bench.peak_matmul, "stage1": bench.stage1, "extract": bench.extract_bare, "data": bench.data,
             "augment": bench.augment, "train": bench.train, "pipeline": bench.pipeline, "fusion": bench.fusion,
             "disk": bench.disk}
    for name in a.phases.split(","):
        bench.phase(name, steps[name])
    print(f"errors: {bench.r['errors'] or 'none'}", flush=True)


if __name__ == "__main__":
    main()
