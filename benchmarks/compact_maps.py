"""What compact maps cost in accuracy: fusion mAP from float16, float8 and pooled (--pool 2) stores.

One stage-1 model (test_convnext at 256 px on the synthetic demo, so its maps are 64 x 8 x 8), three
stores extracted from it (float16; float8 e4m3 with per-channel scales; float16 average-pooled 2 x 2
to 4 x 4), then fusion trained from each with several seeds and scored on the test split (mAP per
study, flip TTA off: the stores hold no flipped maps). Prints a Markdown table: mean +- sd over the
seeds, bytes per image and the size saving.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compact_maps.py --seeds 3 -o compact-maps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

VARIANTS = {"float16": dict(dtype="float16", pool=1), "float8": dict(dtype="float8", pool=1),
            "pool 2": dict(dtype="float16", pool=2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("compact-maps-work"), help="folder for data, runs, stores")
    ap.add_argument("--studies", type=int, default=600, help="synthetic demo studies")
    ap.add_argument("--size", type=int, default=256, help="image size (256: 8 x 8 maps with test_convnext)")
    ap.add_argument("--model", default="test_convnext", help="timm backbone for stage 1")
    ap.add_argument("--backbone-epochs", type=float, default=4, help="stage-1 epochs")
    ap.add_argument("--fusion-epochs", type=float, default=20, help="fusion epochs")
    ap.add_argument("--seeds", type=int, default=3, help="fusion seeds per store")
    ap.add_argument("-o", "--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    from chx.data.demo import make_demo_data
    from chx.engine.inference import store_study_probs
    from chx.metrics import summarize
    from chx.models import load_checkpoint, load_model
    from chx.options import BackboneOptions, FusionOptions, TrainConfig
    from chx.pipeline.extract import extract_features
    from chx.pipeline.train_backbone import train_backbone
    from chx.pipeline.train_fusion import train_fusion
    from chx.store import open_store

    t0 = time.perf_counter()
    work = a.work
    manifest = make_demo_data(work / "data", studies=a.studies, seed=0, size=a.size, val_fraction=0.15,
                              test_fraction=0.35)
    images = work / "data" / "images"
    backbone = work / "backbone"
    train_backbone([manifest], [images], backbone, BackboneOptions(model=a.model, size=a.size, pretrained=False),
                   TrainConfig(epochs=a.backbone_epochs, lr=1e-3, batch_size=16, workers=1, seed=0, val_every=1.0,
                               warmup=0.1), overwrite=True)
    results = {}
    for name, v in VARIANTS.items():
        store = str(work / f"{name.replace(' ', '')}.zarr")
        extract_features(backbone / "best.pt", manifest, images, store, workers=1, batch_size=32, overwrite=True,
                         echo=lambda *x: None, **v)
        with open_store(store) as s:
            bytes_per_image, shape = s.stored_bytes_per_image, s.feature_shape
        maps = []
        for seed in range(a.seeds):
            run = work / f"fusion-{name.replace(' ', '')}-{seed}"
            train_fusion(store, run, FusionOptions(), TrainConfig(epochs=a.fusion_epochs, lr=3e-4, batch_size=16,
                                                                   workers=0, seed=seed, val_every=1.0, warmup=0.1),
                         overwrite=True)
            ckpt = load_checkpoint(run / "best.pt", kind="fusion")
            probs, ds = store_study_probs(load_model(ckpt), store, "test")
            maps.append(summarize(probs, ds.labels, list(ckpt["class_names"]))["mAP"])
        results[name] = {"mAP": maps, "mean": statistics.mean(maps), "sd": statistics.stdev(maps) if len(maps) > 1
                         else 0.0, "bytes_per_image": bytes_per_image, "shape": list(shape)}
        print(name, results[name], flush=True)
    base = results["float16"]["bytes_per_image"]
    lines = ["| store | map shape | bytes per image | size vs float16 | test mAP (mean +- sd, "
             f"{a.seeds} fusion seeds) |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {' x '.join(map(str, r['shape']))} | {r['bytes_per_image']:,} | "
                     f"{r['bytes_per_image'] / base:.2f}x | {r['mean']:.3f} +- {r['sd']:.3f} |")
    table = "\n".join(lines)
    print(table)
    out = {"results": results, "table": table, "seconds": time.perf_counter() - t0,
           "config": {k: str(v) for k, v in vars(a).items()}}
    if a.out:
        a.out.write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
