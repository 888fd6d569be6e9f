"""`chx predict --manifest` against the store path it must match in cost: extracting the same
images' maps with flip (`extract-features --flip`) plus running fusion on them. Target: ratio <= 1.2.

    .venv/bin/python benchmarks/bench_predict.py [--model convnext_atto] [--size 224] [--repeats 3]

Real images: the covid-cxr collection (../shared/data/covid-cxr, 396 files, 391 distinct images of
328 studies), every split. Random weights (no download: speed does not depend on the weights); a
fusion model of the paper's defaults trained for one step on the store (for its fingerprint). Both
sides run in this process with their models loaded by their own code, images decoded by the same
number of DataLoader workers, the same batch size; each timing is the median of ``--repeats`` runs
(interleaved: A, B, A, B, ...):

- A = extract-features --flip into a new Zarr store + fusion (flip TTA) over every split of it;
- B = predict: collect the manifest's images, load the models, predict every study, write the CSV.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, median  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-cxr"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)

    from chx.data.manifest import class_columns, read_manifest
    from chx.data.transforms import Preprocess
    from chx.engine.inference import store_study_probs
    from chx.options import FusionOptions, TrainConfig
    from chx.models import load_checkpoint, load_model, save_checkpoint
    from chx.models.backbone import ImageClassifier
    from chx.pipeline.extract import extract_features
    from chx.pipeline.predict import collect_inputs, load_predictor, predict
    from chx.pipeline.prepare import prepare
    from chx.pipeline.train_fusion import train_fusion

    work = a.work or Path(tempfile.mkdtemp(prefix="chx-bench-predict-"))
    images = a.data / "images"
    manifest = work / "covid.parquet"
    if not manifest.exists():
        prepare("covid", [a.data / "metadata.csv"], manifest, images=images, val_fraction=0.25, seed=0)
    df = read_manifest(manifest)
    classes = class_columns(df)
    ckpt = work / f"backbone-{a.model}-{a.size}.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        net = ImageClassifier(a.model, num_classes=len(classes))
        save_checkpoint({"kind": "backbone", "model_config": net.config, "state_dict": net.state_dict(),
                         "class_names": classes, "preprocess": Preprocess(a.size).to_dict(),
                         "train_counts": [1] * len(classes), "tta": False}, ckpt)
    common = dict(batch_size=a.batch_size, workers=a.workers, device=a.device)

    def store_path(n: int) -> Path:
        return work / f"features-{n}.zarr"

    def run_store(n: int) -> float:
        """A: extract-features --flip into a new store, then fusion over all its studies."""
        shutil.rmtree(store_path(n), ignore_errors=True)
        t0 = time.perf_counter()
        extract_features(ckpt, manifest, images, str(store_path(n)), flip=True, echo=lambda *_: None, **common)
        fusion = load_model(load_checkpoint(fusion_ckpt, kind="fusion"), kind="fusion").to(a.device)
        for split in ("train", "val", "test"):
            store_study_probs(fusion, str(store_path(n)), split, batch_size=a.batch_size, device=a.device)
        return time.perf_counter() - t0

    def run_predict(n: int) -> float:
        """B: chx predict --manifest (every split) -> CSV."""
        t0 = time.perf_counter()
        inputs = collect_inputs(manifest=manifest, images=images)
        predictor = load_predictor("torch", backbone=ckpt, fusion=fusion_ckpt, device=a.device)
        predict(predictor, inputs, work / f"predictions-{n}.csv", "csv", batch_size=a.batch_size,
                workers=a.workers)
        return time.perf_counter() - t0

    # Set-up (not timed): a store and a fusion model trained one step on it.
    fusion_ckpt = work / "fusion" / "best.pt"
    if not fusion_ckpt.exists():
        extract_features(ckpt, manifest, images, str(store_path(0)), flip=True, echo=lambda *_: None, **common)
        train_fusion(str(store_path(0)), work / "fusion", FusionOptions(),
                     TrainConfig(epochs=1, max_steps=1, workers=0, device=a.device))
    print(f"set-up done in {work}", flush=True)
    store_s, predict_s = [], []
    for n in range(a.repeats):
        store_s.append(run_store(n + 1))
        predict_s.append(run_predict(n + 1))
        print(f"  run {n + 1}: extract + fusion {store_s[-1]:.1f} s, predict {predict_s[-1]:.1f} s", flush=True)
        shutil.rmtree(store_path(n + 1), ignore_errors=True)
    s, p = median(store_s), median(predict_s)
    print(f"{a.model} at {a.size} px, {df.height} images of {df['study_id'].n_unique()} studies, batch {a.batch_size}, "
          f"{a.workers} workers, {a.device}, median of {a.repeats}:")
    print(f"  extract-features --flip + fusion  {s:7.1f} s   ({', '.join(f'{x:.1f}' for x in store_s)})")
    print(f"  predict --manifest                {p:7.1f} s   ({', '.join(f'{x:.1f}' for x in predict_s)})")
    print(f"  ratio predict / (extract + fusion) {p / s:.2f}   (target <= 1.2)")
    record = {"benchmark": "predict --manifest / (extract-features --flip + fusion)", "value": f"{p / s:.2f}",
              "detail": f"{p:.1f} s vs {s:.1f} s, {df.height} images, {a.model} {a.size} px", "target": "<= 1.2"}
    emit(record)
    return [record]


if __name__ == "__main__":
    main()
