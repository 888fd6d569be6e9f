"""CPU predict latency of one 2-view study: torch (`chx predict`) against ONNX Runtime
(`chx predict --runtime onnxruntime`), in the same run, on the same images and threads.

For each backbone and input size: random weights (speed does not depend on them) with the 26 CXR-LT
classes and the paper's fusion model (2 encoder layers, D = C, 4 view slots); the graphs exported as
`chx export --format onnx` does; a 2-view study of two 1024 x 1024 PNGs, predicted end to end
(decode, resize, backbone, fusion) by each runtime in turn, alternating, after a warm-up. Reports
medians and the speed-up (torch median / onnxruntime median). Target (issue 18): >= 1.3x for
convnext_atto at 256 px.

    .venv/bin/python benchmarks/bench_onnx.py --repeats 20 -o onnx.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import emit

CASES = (("convnext_atto", 256), ("convnext_small", 512))
N_CLASSES = 26


def study_images(folder: Path) -> list[Path]:
    """Two 1024 x 1024 grayscale PNGs with smooth structure and noise (a frontal and a lateral)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1024, 0:1024]
    paths = []
    for i in range(2):
        img = 120 + 60 * np.sin(x / (90.0 + 20 * i)) * np.cos(y / 130.0) + rng.normal(0, 12, x.shape)
        paths.append(folder / f"view{i}.png")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def predictors(model: str, size: int, folder: Path, threads: int):
    """The torch Predictor and the OnnxPredictor of one random-weight model pair."""
    from chx.data.transforms import Preprocess
    from chx.engine.onnx_runtime import OnnxPredictor, export_graphs
    from chx.engine.predictor import FOLDER_CONFIG, INTEGRITY_KEY, Predictor, folder_config, integrity_record
    from chx.models import create_model

    torch.manual_seed(0)
    backbone = create_model("backbone", backbone_name=model, num_classes=N_CLASSES).eval()
    fusion = create_model("fusion", in_dim=backbone.feature_dim, num_classes=N_CLASSES).eval()
    pre = Preprocess(size)
    bundle = {"class_names": [f"c{i}" for i in range(N_CLASSES)], "features": {"pool": 1, "flip_tta": False},
              "backbone": {"model_config": backbone.config, "preprocess": pre.to_dict(),
                           "state_dict": backbone.state_dict()},
              "fusion": {"model_config": fusion.config, "state_dict": fusion.state_dict()}}
    bundle["integrity"] = integrity_record(bundle)    # what OnnxPredictor.load checks
    t = time.perf_counter()
    export_graphs(backbone, fusion, 1, size, folder, metadata={INTEGRITY_KEY: json.dumps(bundle["integrity"])})
    export_s = time.perf_counter() - t
    (folder / FOLDER_CONFIG).write_text(json.dumps(folder_config(bundle)))
    torch_p = Predictor(backbone, fusion, pre, 1, False, bundle["class_names"], torch.device("cpu"))
    return torch_p, OnnxPredictor.load(folder, threads=threads), export_s


def measure(model: str, size: int, repeats: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = study_images(tmp)
        torch_p, onnx_p, export_s = predictors(model, size, tmp, threads)
        args = (paths, ["PA", "LATERAL"], ["view0", "view1"])
        diff = float(np.abs(torch_p.predict_study(*args) - onnx_p.predict_study(*args)).max())   # + warm-up
        times = {"torch": [], "onnxruntime": []}
        for _ in range(repeats):
            for name, p in (("torch", torch_p), ("onnxruntime", onnx_p)):
                t = time.perf_counter()
                p.predict_study(*args)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"benchmark": f"predict latency, 2-view study, {model} {size} px",
            "torch_ms": round(1000 * med["torch"], 1), "onnxruntime_ms": round(1000 * med["onnxruntime"], 1),
            "speedup": round(med["torch"] / med["onnxruntime"], 2), "max_abs_diff": diff,
            "export_s": round(export_s, 1), "repeats": repeats, "threads": threads}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed studies per runtime (medians reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="CPU threads of both runtimes  [default: all cores]")
    ap.add_argument("--cases", nargs="*", default=[f"{m}:{s}" for m, s in CASES], metavar="MODEL:SIZE",
                    help="backbones and input sizes  [default: convnext_atto:256 convnext_small:512]")
    ap.add_argument("-o", "--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for case in a.cases:
        model, size = case.split(":")
        rows.append(measure(model, int(size), a.repeats, a.threads))
        emit(rows[-1])
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
