"""`chx evaluate`: long-tail metrics, a report folder and plots for a backbone, fusion or joint checkpoint.

A fusion checkpoint is evaluated per study from the feature store (``views`` keeps only frontal or
lateral views, to measure robustness to a missing view; flipped maps in the store give hflip TTA);
a backbone checkpoint per image from a manifest and its images (hflip TTA as trained); a joint
checkpoint (`chx train-joint`) per study from a manifest and its images, as it validated (deterministic
views, flip TTA when it validated with it; ``views`` as for fusion). F1 uses
per-class thresholds tuned for max F1 on ``thresholds_from`` (default: the validation split), or
0.5 when there is none. mAP intervals: a bootstrap over the evaluated rows (studies, or images for
a backbone) with ``bootstrap`` resamples (:func:`chx.metrics.uncertainty`; 0: none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.atomic import output_lock
from chx.data.datasets import ImageDataset, label_matrix
from chx.data.manifest import class_columns, read_manifest
from chx.data.study_images import StudyImageDataset
from chx.data.transforms import Preprocess
from chx.engine.compat import check_fusion_store, leakage_warning, require_same_classes
from chx.engine.inference import load_backbone, predict_images, store_study_probs
from chx.engine.joint import predict_study_images
from chx.engine.trainer import warn
from chx.errors import ChxError
from chx.metrics import BOOTSTRAP_RESAMPLES, DEFAULT_GROUPS, evaluate_scores, tune_thresholds
from chx.options import EvaluateOptions
from chx.models import load_checkpoint, load_model
from chx.pipeline.report import check_report_folder, write_report


def _fusion_scores(ckpt: dict, store: str, split: str, views: str, batch_size: int):
    scores, ds = store_study_probs(load_model(ckpt, kind="fusion"), store, split, views=views,
                                   batch_size=batch_size)
    return scores, (ds.labels if scores is not None else None), ds.study_ids


def _backbone_scores(checkpoint: Path, df: pl.DataFrame, images: Path, split: str, batch_size: int,
                     workers: int):
    part = df.filter(pl.col("split") == split)
    if part.height == 0:
        return None, None, []
    model, ckpt = load_backbone(checkpoint)
    classes = list(ckpt["class_names"])
    ds = ImageDataset(part, images, Preprocess.from_dict(ckpt["preprocess"]), classes=classes)
    ds.require_files()
    scores = predict_images(model, ds, batch_size=batch_size, workers=workers, tta=bool(ckpt.get("tta", True)),
                            desc=f"evaluate {split}")
    return scores, label_matrix(part, classes), part["image_id"].to_list()


def _joint_scores(ckpt: dict, df: pl.DataFrame, images: Path, split: str, views: str, batch_size: int,
                  workers: int):
    model = load_model(ckpt, kind="joint")
    ds = StudyImageDataset(df.filter(pl.col("split") == split), images,
                           Preprocess.from_dict(ckpt["preprocess"]), max_views=model.max_views, views=views,
                           classes=list(ckpt["class_names"]))
    if len(ds) == 0:
        return None, None, []
    ds.require_files()
    scores = predict_study_images(model, ds, batch_size=batch_size, workers=workers,
                                  tta=bool(ckpt.get("tta", True)), desc=f"evaluate {split}")
    return scores, ds.labels, ds.study_ids


def evaluate(checkpoint: Path, out: Path, *, overwrite: bool = False, **options) -> dict:
    """Evaluate ``checkpoint`` into the report folder ``out`` (options: those of :func:`_evaluate`).
    The folder is checked first (the overwrite rule: :func:`chx.pipeline.report.check_report_folder`)
    and locked while the evaluation runs, so two evaluations into one folder do not race."""
    check_report_folder(Path(out), overwrite)
    with output_lock(out, "report"):
        return _evaluate(checkpoint, out, overwrite=overwrite, **options)


def _evaluate(checkpoint: Path, out: Path, *, store: str | None = None, manifest: Path | None = None,
             images: Path | None = None, split: str = EvaluateOptions.split,
             thresholds_from: str | None = EvaluateOptions.thresholds_from, groups: str = DEFAULT_GROUPS,
             views: str = EvaluateOptions.views, batch_size: int = EvaluateOptions.batch_size,
             workers: int = EvaluateOptions.workers, overwrite: bool = False,
             absent_classes: str = EvaluateOptions.absent_classes,
             bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict:
    ckpt = load_checkpoint(checkpoint)
    kind = ckpt.get("kind")
    classes = list(ckpt["class_names"])
    if kind == "fusion":
        if store is None:
            raise ChxError("a fusion checkpoint is evaluated on a feature store: give --store")
        available = check_fusion_store(ckpt, checkpoint, store)
        compute = lambda sp: _fusion_scores(ckpt, store, sp, views, batch_size)  # noqa: E731
    elif kind == "backbone":
        if manifest is None or images is None:
            raise ChxError("a backbone checkpoint is evaluated on images: give --manifest and --images")
        if views != "all":
            raise ChxError("--views applies to fusion checkpoints (a backbone scores single images)")
        df = read_manifest(manifest)
        require_same_classes(class_columns(df), classes, str(manifest), str(checkpoint))
        available = sorted(set(df["split"].drop_nulls().to_list()))
        compute = lambda sp: _backbone_scores(checkpoint, df, images, sp, batch_size, workers)  # noqa: E731
    elif kind == "joint":
        if manifest is None or images is None:
            raise ChxError("a joint checkpoint is evaluated on images: give --manifest and --images")
        df = read_manifest(manifest)
        require_same_classes(class_columns(df), classes, str(manifest), str(checkpoint))
        available = sorted(set(df["split"].drop_nulls().to_list()))
        compute = lambda sp: _joint_scores(ckpt, df, images, sp, views, batch_size, workers)  # noqa: E731
    else:
        raise ChxError(f"{checkpoint} is a {kind} checkpoint; evaluate a backbone, fusion or joint "
                       f"checkpoint")
    if kind in ("backbone", "joint"):
        leak = leakage_warning(ckpt, df.filter(pl.col("split") == split), manifest, checkpoint)
        if leak:
            warn(leak)
    if split not in available:
        raise ChxError(f"split {split!r} is not in the data (it has: {', '.join(available) or 'no splits'}); "
                       f"use --split with one of them")

    scores, labels, ids = compute(split)
    if scores is None:
        raise ChxError(f"no {'image' if kind == 'backbone' else 'study'} of split {split!r} has a "
                       f"{views} view" if views != "all" else f"split {split!r} is empty")
    thresholds, tuned_on = None, None
    if thresholds_from and thresholds_from != split and thresholds_from in available:
        val_scores, val_labels, _ = compute(thresholds_from)
        if val_scores is not None:
            thresholds, tuned_on = tune_thresholds(val_scores, val_labels), thresholds_from
    train_counts = np.asarray(ckpt["train_counts"]) if ckpt.get("train_counts") else None
    prevalence = np.asarray(ckpt["class_prior"]) if ckpt.get("class_prior") else None
    result = evaluate_scores(scores, labels, classes, train_counts=train_counts, thresholds=thresholds,
                             groups=groups, prevalence=prevalence, absent=absent_classes, bootstrap=bootstrap)
    result["meta"] = {"checkpoint": str(checkpoint), "kind": kind, "split": split, "views": views,
                      "thresholds_from": tuned_on or "0.5 (no tuning split)",
                      "data": str(store if kind == "fusion" else manifest)}
    result["unit"] = "images" if kind == "backbone" else "studies"
    title = f"{kind} {checkpoint} on {split}" + (f" ({views} views)" if views != "all" else "")
    write_report(out, result, scores=scores, labels=labels, class_names=classes, title=title, ids=ids,
                 id_name="image_id" if kind == "backbone" else "study_id", overwrite=overwrite)
    return result
