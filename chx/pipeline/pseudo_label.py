"""`chx pseudo-label`: fill a manifest's unannotated (null) labels with a stage-1 model's
probabilities (soft labels). The dataset's own 0/1 labels are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.data.datasets import ImageDataset, label_matrix
from chx.data.image_cache import open_image_cache
from chx.data.manifest import class_columns, read_manifest, validate, write_manifest
from chx.data.transforms import Preprocess
from chx.engine.compat import require_same_classes
from chx.engine.distributed import resolve_device
from chx.engine.inference import load_backbone, predict_images
from chx.options import PseudoLabelOptions


def pseudo_label(checkpoint: Path, manifest: Path, images: Path, out: Path, *,
                 tta: bool = PseudoLabelOptions.tta, batch_size: int = PseudoLabelOptions.batch_size,
                 workers: int = PseudoLabelOptions.workers, device: str = PseudoLabelOptions.device,
                 images_cache: str | None = None) -> dict:
    model, ckpt = load_backbone(checkpoint)
    df = read_manifest(manifest)
    classes = class_columns(df)
    require_same_classes(classes, ckpt["class_names"], str(manifest), str(checkpoint))
    pre = Preprocess.from_dict(ckpt["preprocess"])
    dataset = ImageDataset(df, images, pre, train=False, classes=classes, cache=open_image_cache(images_cache, pre))
    dataset.require_files()
    dev = resolve_device(device)
    model.to(dev)
    probs = predict_images(model, dataset, batch_size=batch_size, workers=workers, device=dev, tta=tta,
                          desc="pseudo-label")
    labels = label_matrix(df, classes)
    filled = np.where(np.isnan(labels), probs, labels).astype(np.float32)
    result = df.with_columns([pl.Series(c, filled[:, i], dtype=pl.Float32) for i, c in enumerate(classes)])
    result = validate(result, source="pseudo-labelled manifest", soft=True)
    write_manifest(result, out)
    return {"images": df.height, "filled": int(np.isnan(labels).sum()),
            "kept": int((~np.isnan(labels)).sum())}
