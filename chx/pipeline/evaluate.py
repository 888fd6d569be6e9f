"""`chx evaluate`: long-tail metrics, a report folder and plots for a backbone or fusion checkpoint.

A fusion checkpoint is evaluated per study from the feature store (``views`` keeps only frontal or
lateral views, to measure robustness to a missing view; flipped maps in the store give hflip TTA);
a backbone checkpoint per image from a manifest and its images (hflip TTA as trained). F1 uses
per-class thresholds tuned for max F1 on ``thresholds_from`` (default: the validation split), or
0.5 when there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.data.datasets import ImageDataset, label_matrix
from chx.data.manifest import class_columns, read_manifest
from chx.data.study_dataset import StudyDataset
from chx.data.transforms import Preprocess
from chx.errors import ChxError
from chx.metrics import evaluate_scores, tune_thresholds
from chx.models.fusion import FusionModel
from chx.pipeline.checkpoint import load_checkpoint
from chx.pipeline.inference import eval_weights, predict_probs
from chx.pipeline.pseudo_label import load_backbone
from chx.pipeline.report import write_report
from chx.pipeline.train_fusion import predict_studies
from chx.store import open_store


def fusion_scores(ckpt: dict, store: str, split: str, views: str = "all", batch_size: int = 16):
    """Study probabilities of a fusion checkpoint on a store split (hflip TTA when the store holds
    flipped maps, as `chx predict` does) and the StudyDataset they follow; (None, ds) if empty."""
    model = FusionModel.from_config(ckpt["model_config"])
    model.load_state_dict(eval_weights(ckpt))
    ds = StudyDataset(store, split, max_views=model.max_views, views=views)
    if len(ds) == 0:
        return None, ds
    scores = predict_studies(model, ds, batch_size=batch_size, desc=f"fusion on {split}")
    if ds.has_flip:
        flipped = StudyDataset(store, split, max_views=model.max_views, views=views, use_flip=True)
        scores = 0.5 * (scores + predict_studies(model, flipped, batch_size=batch_size, desc="flip TTA"))
    return scores, ds


def _fusion_scores(ckpt: dict, store: str, split: str, views: str, batch_size: int):
    scores, ds = fusion_scores(ckpt, store, split, views, batch_size)
    return scores, (ds.labels if scores is not None else None)


def _backbone_scores(checkpoint: Path, df: pl.DataFrame, images: Path, split: str, batch_size: int,
                     workers: int):
    part = df.filter(pl.col("split") == split)
    if part.height == 0:
        return None, None
    model, ckpt = load_backbone(checkpoint)
    classes = list(ckpt["class_names"])
    ds = ImageDataset(part, images, Preprocess.from_dict(ckpt["preprocess"]), classes=classes)
    ds.require_files()
    scores = predict_probs(model, ds, batch_size=batch_size, workers=workers, tta=bool(ckpt.get("tta", True)),
                           desc=f"evaluate {split}")
    return scores, label_matrix(part, classes)


def evaluate(checkpoint: Path, out: Path, *, store: str | None = None, manifest: Path | None = None,
             images: Path | None = None, split: str = "test", thresholds_from: str | None = "val",
             groups: str = "thirds", views: str = "all", batch_size: int = 16, workers: int = 2) -> dict:
    ckpt = load_checkpoint(checkpoint)
    kind = ckpt.get("kind")
    classes = list(ckpt["class_names"])
    if kind == "fusion":
        if store is None:
            raise ChxError("a fusion checkpoint is evaluated on a feature store: give --store")
        with open_store(store) as s:
            if list(s.class_names) != classes:
                raise ChxError(f"store {store} holds other classes than {checkpoint}; evaluate on the store "
                               f"the fusion model was trained on (or one extracted with the same classes)")
            available = sorted(set(s.splits) - {""})
        compute = lambda sp: _fusion_scores(ckpt, store, sp, views, batch_size)  # noqa: E731
    elif kind == "backbone":
        if manifest is None or images is None:
            raise ChxError("a backbone checkpoint is evaluated on images: give --manifest and --images")
        if views != "all":
            raise ChxError("--views applies to fusion checkpoints (a backbone scores single images)")
        df = read_manifest(manifest)
        if class_columns(df) != classes:
            raise ChxError(f"{manifest} has other classes than {checkpoint}; prepare it onto the "
                           f"checkpoint's classes (`chx prepare ... --classes`)")
        available = sorted(set(df["split"].drop_nulls().to_list()))
        compute = lambda sp: _backbone_scores(checkpoint, df, images, sp, batch_size, workers)  # noqa: E731
    else:
        raise ChxError(f"{checkpoint} is a {kind} checkpoint; evaluate a backbone or fusion checkpoint")
    if split not in available:
        raise ChxError(f"split {split!r} is not in the data (it has: {', '.join(available) or 'no splits'}); "
                       f"use --split with one of them")

    scores, labels = compute(split)
    if scores is None:
        raise ChxError(f"no {'study' if kind == 'fusion' else 'image'} of split {split!r} has a "
                       f"{views} view" if views != "all" else f"split {split!r} is empty")
    thresholds, tuned_on = None, None
    if thresholds_from and thresholds_from != split and thresholds_from in available:
        val_scores, val_labels = compute(thresholds_from)
        if val_scores is not None:
            thresholds, tuned_on = tune_thresholds(val_scores, val_labels), thresholds_from
    train_counts = np.asarray(ckpt["train_counts"]) if ckpt.get("train_counts") else None
    result = evaluate_scores(scores, labels, classes, train_counts=train_counts, thresholds=thresholds,
                             groups=groups)
    result["meta"] = {"checkpoint": str(checkpoint), "kind": kind, "split": split, "views": views,
                      "thresholds_from": tuned_on or "0.5 (no tuning split)",
                      "data": str(store if kind == "fusion" else manifest)}
    title = f"{kind} {checkpoint} on {split}" + (f" ({views} views)" if views != "all" else "")
    write_report(out, result, scores=scores, labels=labels, class_names=classes, title=title)
    return result
