"""Shared set-up of the benchmarks: demo data and a backbone checkpoint (random weights: speed and
size do not depend on the weights), created once in a work folder."""

from __future__ import annotations

import json
import resource
import statistics
from pathlib import Path

import torch

from chx.data.demo import CLASS_NAMES, make_demo_data
from chx.data.transforms import Preprocess
from chx.models.backbone import ImageClassifier
from chx.models import save_checkpoint


def demo_data(work: Path, studies: int, size: int) -> Path:
    manifest = work / f"demo-{studies}-{size}" / "manifest.parquet"
    if not manifest.exists():
        make_demo_data(manifest.parent, studies=studies, size=size, seed=0)
    return manifest


def backbone_checkpoint(work: Path, model: str, size: int) -> Path:
    path = work / f"backbone-{model}-{size}.pt"
    if not path.exists():
        torch.manual_seed(0)
        net = ImageClassifier(model, num_classes=len(CLASS_NAMES))
        save_checkpoint({"kind": "backbone", "model_config": net.config, "state_dict": net.state_dict(),
                         "class_names": list(CLASS_NAMES), "preprocess": Preprocess(size).to_dict(),
                         "train_counts": [1] * len(CLASS_NAMES), "tta": False}, path)
    return path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs):
    return statistics.median(xs)


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)
