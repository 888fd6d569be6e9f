"""`chx pseudo-label`: fill a manifest's unannotated (null) labels with a stage-1 model's
probabilities (soft labels). The dataset's own 0/1 labels are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.data.datasets import ImageDataset, label_matrix
from chx.data.manifest import class_columns, read_manifest, validate, write_manifest
from chx.data.transforms import Preprocess
from chx.errors import ChxError
from chx.models.backbone import ImageClassifier
from chx.pipeline.checkpoint import load_checkpoint
from chx.pipeline.inference import eval_weights, predict_probs, resolve_device


def load_backbone(checkpoint: Path) -> tuple[ImageClassifier, dict]:
    """A stage-1 model ready to predict (EMA weights when the run kept them) and its checkpoint."""
    ckpt = load_checkpoint(checkpoint, kind="backbone")
    model = ImageClassifier.from_config(ckpt["model_config"])
    model.load_state_dict(eval_weights(ckpt))
    model.eval()
    return model, ckpt


def pseudo_label(checkpoint: Path, manifest: Path, images: Path, out: Path, *, tta: bool = True,
                 batch_size: int = 16, workers: int = 2, device: str = "auto") -> dict:
    model, ckpt = load_backbone(checkpoint)
    df = read_manifest(manifest)
    classes = class_columns(df)
    if classes != list(ckpt["class_names"]):
        raise ChxError(f"{manifest} has classes {classes[:3]}... ({len(classes)}) but {checkpoint} was "
                       f"trained on {list(ckpt['class_names'])[:3]}... ({len(ckpt['class_names'])}); "
                       f"prepare the manifest onto the checkpoint's classes (`chx prepare ... --classes`)")
    dataset = ImageDataset(df, images, Preprocess.from_dict(ckpt["preprocess"]), train=False,
                           classes=classes)
    dataset.require_files()
    dev = resolve_device(device)
    model.to(dev)
    probs = predict_probs(model, dataset, batch_size=batch_size, workers=workers, device=dev, tta=tta,
                          desc="pseudo-label")
    labels = label_matrix(df, classes)
    filled = np.where(np.isnan(labels), probs, labels).astype(np.float32)
    result = df.with_columns([pl.Series(c, filled[:, i], dtype=pl.Float32) for i, c in enumerate(classes)])
    result = validate(result, source="pseudo-labelled manifest", soft=True)
    write_manifest(result, out)
    return {"images": df.height, "filled": int(np.isnan(labels).sum()),
            "kept": int((~np.isnan(labels)).sum())}
