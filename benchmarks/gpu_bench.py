"""GPU benchmark at the paper's configuration: stage-1 training images/s, extraction images/s
(bare forward and the real pipeline with decoding and store writes), fusion training studies/s,
each against the GPU's bf16 peak, and the fusion store-vs-recompute ratio at this scale.

Run through benchmarks/gpu.sh on a GPU machine (no network needed: random weights). `--smoke` runs
the same code on the CPU with a tiny model, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Dense bf16 tensor-core peaks (TFLOP/s) by device name; --peak-tflops overrides.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def flops_per_call(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_small.fb_in22k_ft_in1k")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fusion-batch", type=int, default=8)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--classes", type=int, default=26)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--pipeline-images", type=int, default=256)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.size, a.batch, a.fusion_batch, a.iters, a.pipeline_images = "test_convnext", 64, 4, 2, 2, 16

    from chx.losses import weighted_asl
    from chx.models.backbone import ImageClassifier
    from chx.models.fusion import FusionModel

    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    results = {"device": name, "model": a.model, "size": a.size, "batch": a.batch, "peak_tflops": peak,
               "torch": torch.__version__}
    torch.backends.cudnn.benchmark = True

    # ---- stage 1 training (bf16 autocast, channels_last, grad checkpointing)
    model = ImageClassifier(a.model, a.classes).to(device).to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
    x = torch.randn(a.batch, 1, a.size, a.size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(a.batch, a.classes, device=device) < 0.1).float()
    prior = torch.full((a.classes,), 0.1, device=device)

    def train_step():
        with torch.autocast(**amp):
            loss = weighted_asl(model(x), y, prior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_s = timed(train_step, 3, a.iters, device)
    fwd_flops = flops_per_call(lambda: model(x[:1]))          # one image, forward
    results["stage1_train_images_per_s"] = a.batch / step_s
    results["stage1_train_tflops"] = 3 * fwd_flops * a.batch / step_s / 1e12   # fwd + 2x bwd
    if device.type == "cuda":
        results["stage1_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # ---- extraction: bare forward_features
    model.eval()
    with torch.no_grad():
        feat_flops = flops_per_call(lambda: model.forward_features(x[:1]))

        def extract_step():
            with torch.autocast(**amp):
                model.forward_features(x).to(torch.float16)
        ext_s = timed(extract_step, 2, a.iters, device)
    results["extract_bare_images_per_s"] = a.batch / ext_s
    results["extract_tflops"] = feat_flops * a.batch / ext_s / 1e12
    c = model.feature_dim
    h = a.size // model.feature_stride

    # ---- extraction: the real pipeline (decode in workers, write a Zarr store) on demo images
    from common import backbone_checkpoint, demo_data

    from chx.pipeline.extract import extract_features

    work = Path(tempfile.mkdtemp(prefix="chx-gpu-"))
    manifest = demo_data(work, a.pipeline_images // 2, a.size)
    ckpt = backbone_checkpoint(work, a.model, a.size)
    t0 = time.perf_counter()
    r = extract_features(ckpt, manifest, manifest.parent / "images", str(work / "f.zarr"), batch_size=a.batch,
                         workers=min(8, os.cpu_count() or 1), echo=lambda *_: None)
    results["extract_pipeline_images_per_s"] = r.images_per_s
    results["extract_pipeline_wall_s"] = time.perf_counter() - t0
    results["extract_pipeline_ratio"] = r.images_per_s / results["extract_bare_images_per_s"]

    # ---- fusion training from cached maps (C x h x w per view, 4 views)
    model = opt = None  # free the stage-1 memory before the fusion benchmark
    fusion = FusionModel(c, a.classes, max_views=a.views).to(device)
    fopt = torch.optim.AdamW(fusion.parameters(), lr=3e-5)
    f = torch.randn(a.fusion_batch, a.views, c, h, h, device=device)
    mask = torch.ones(a.fusion_batch, a.views, dtype=torch.bool, device=device)
    fy = (torch.rand(a.fusion_batch, a.classes, device=device) < 0.1).float()

    def fusion_step():
        with torch.autocast(**amp):
            loss = weighted_asl(fusion(f, mask), fy, prior)
        fopt.zero_grad(set_to_none=True)
        loss.backward()
        fopt.step()

    fstep = timed(fusion_step, 3, a.iters, device)
    fflops = flops_per_call(lambda: fusion(f[:1], mask[:1]))
    results["fusion_train_studies_per_s"] = a.fusion_batch / fstep
    results["fusion_train_tflops"] = 3 * fflops * a.fusion_batch / fstep / 1e12
    # Recomputing features each epoch costs `views` backbone forwards per study on top of the step.
    per_study_store = fstep / a.fusion_batch
    per_study_recompute = per_study_store + a.views / results["extract_bare_images_per_s"]
    results["fusion_store_vs_recompute"] = per_study_recompute / per_study_store
    if peak:
        for k in ("stage1_train", "extract", "fusion_train"):
            results[f"{k}_mfu"] = results[f"{k}_tflops"] / peak

    a.out.write_text(json.dumps(results, indent=2))
    for k, v in results.items():
        print(f"{k:<34} {v:.3f}" if isinstance(v, float) else f"{k:<34} {v}")


if __name__ == "__main__":
    main()
