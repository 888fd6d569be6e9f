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

from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from chx.atomic import output_lock
from chx.data.datasets import ImageDataset, label_matrix
from chx.data.image_cache import open_image_cache
from chx.data.manifest import class_columns, images_root, read_manifest
from chx.data.study_images import StudyImageDataset
from chx.data.transforms import Preprocess
from chx.engine.compat import check_fusion_store, leakage_warning, require_same_classes
from chx.engine.inference import predict_images, store_study_probs
from chx.engine.joint import predict_study_images
from chx.engine.trainer import warn
from chx.errors import ChxError
from chx.metrics import BOOTSTRAP_RESAMPLES, DEFAULT_GROUPS, evaluate_scores, tune_thresholds
from chx.options import EvaluateOptions
from chx.models import load_checkpoint, load_model
from chx.pipeline.report import check_report_folder, write_report


class _Scorer:
    """The scores of one checkpoint on a split of its data: ``scorer(split)`` -> (scores [N, K], or
    None when the split has nothing to score; labels; ids). One subclass per checkpoint kind; the
    model is built once, on first use, for every split scored (the evaluated one and the thresholds')."""
    kind = ""
    item, unit, id_name = "study", "studies", "study_id"

    def __init__(self, ckpt: dict, views: str, batch_size: int, workers: int):
        self.ckpt, self.views, self.batch_size, self.workers = ckpt, views, batch_size, workers
        self.data: str | Path | None = None     # what is evaluated (store or manifest), for the report
        self.available: list[str] = []           # the splits the data has

    @cached_property
    def model(self):
        return load_model(self.ckpt, kind=self.kind)


class _FusionScorer(_Scorer):
    """A fusion checkpoint, per study from the feature store (flipped maps: flip TTA)."""
    kind = "fusion"

    def __init__(self, ckpt: dict, checkpoint: Path, *, store, views, batch_size, workers, **_):
        if store is None:
            raise ChxError("a fusion checkpoint is evaluated on a feature store: give --store")
        super().__init__(ckpt, views, batch_size, workers)
        self.data = store
        self.available = check_fusion_store(ckpt, checkpoint, store)

    def __call__(self, split: str):
        scores, ds = store_study_probs(self.model, self.data, split, views=self.views, batch_size=self.batch_size)
        return scores, (ds.labels if scores is not None else None), ds.study_ids


class _ManifestScorer(_Scorer):
    """A checkpoint evaluated on a manifest's images: the manifest read once, its classes checked
    against the checkpoint's, a warning when the evaluated split holds training patients."""

    def __init__(self, ckpt: dict, checkpoint: Path, *, manifest, images, split, views, batch_size, workers,
                 images_cache=None, **_):
        if manifest is None:
            raise ChxError(f"a {self.kind} checkpoint is evaluated on images: give --manifest and --images")
        if images is None and images_cache is None:
            images = images_root(manifest)    # one line: the manifest records no root, or it is gone
        self.cache = open_image_cache(images_cache, Preprocess.from_dict(ckpt["preprocess"]))   # --images-cache
        self.check_views(views)
        super().__init__(ckpt, views, batch_size, workers)
        self.data, self.images = manifest, images
        self.df = read_manifest(manifest)
        require_same_classes(class_columns(self.df), list(ckpt["class_names"]), str(manifest), str(checkpoint))
        self.available = sorted(set(self.df["split"].drop_nulls().to_list()))
        leak = leakage_warning(ckpt, self.rows(split), manifest, checkpoint)
        if leak:
            warn(leak)

    def check_views(self, views: str) -> None:
        pass

    def rows(self, split: str) -> pl.DataFrame:
        return self.df.filter(pl.col("split") == split)


class _BackboneScorer(_ManifestScorer):
    """A stage-1 checkpoint, per image (hflip TTA as trained)."""
    kind, item, unit, id_name = "backbone", "image", "images", "image_id"

    def check_views(self, views: str) -> None:
        if views != "all":
            raise ChxError("--views applies to fusion checkpoints (a backbone scores single images)")

    def __call__(self, split: str):
        part = self.rows(split)
        if part.height == 0:
            return None, None, []
        ckpt, classes = self.ckpt, list(self.ckpt["class_names"])
        ds = ImageDataset(part, self.images, Preprocess.from_dict(ckpt["preprocess"]), classes=classes,
                          cache=self.cache)
        ds.require_files()
        scores = predict_images(self.model, ds, batch_size=self.batch_size, workers=self.workers,
                                tta=bool(ckpt.get("tta", True)), desc=f"evaluate {split}")
        return scores, label_matrix(part, classes), part["image_id"].to_list()


class _JointScorer(_ManifestScorer):
    """A joint checkpoint, per study from its images, as it validated (deterministic views, flip TTA)."""
    kind = "joint"

    def __call__(self, split: str):
        ckpt, model = self.ckpt, self.model
        ds = StudyImageDataset(self.rows(split), self.images, Preprocess.from_dict(ckpt["preprocess"]),
                               max_views=model.max_views, views=self.views, classes=list(ckpt["class_names"]),
                               cache=self.cache)
        if len(ds) == 0:
            return None, None, []
        ds.require_files()
        scores = predict_study_images(model, ds, batch_size=self.batch_size, workers=self.workers,
                                      tta=bool(ckpt.get("tta", True)), desc=f"evaluate {split}")
        return scores, ds.labels, ds.study_ids


SCORERS = {s.kind: s for s in (_BackboneScorer, _FusionScorer, _JointScorer)}


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
             bootstrap: int = BOOTSTRAP_RESAMPLES, images_cache: str | None = None) -> dict:
    ckpt = load_checkpoint(checkpoint)
    kind = ckpt.get("kind")
    classes = list(ckpt["class_names"])
    if kind not in SCORERS:
        raise ChxError(f"{checkpoint} is a {kind} checkpoint; evaluate a backbone, fusion or joint "
                       f"checkpoint")
    score = SCORERS[kind](ckpt, checkpoint, store=store, manifest=manifest, images=images, split=split,
                          views=views, batch_size=batch_size, workers=workers, images_cache=images_cache)
    if split not in score.available:
        raise ChxError(f"split {split!r} is not in the data (it has: {', '.join(score.available) or 'no splits'}); "
                       f"use --split with one of them")

    scores, labels, ids = score(split)
    if scores is None:
        raise ChxError(f"no {score.item} of split {split!r} has a "
                       f"{views} view" if views != "all" else f"split {split!r} is empty")
    thresholds, tuned_on = None, None
    if thresholds_from and thresholds_from != split and thresholds_from in score.available:
        val_scores, val_labels, _ = score(thresholds_from)
        if val_scores is not None:
            thresholds, tuned_on = tune_thresholds(val_scores, val_labels), thresholds_from
    train_counts = np.asarray(ckpt["train_counts"]) if ckpt.get("train_counts") else None
    prevalence = np.asarray(ckpt["class_prior"]) if ckpt.get("class_prior") else None
    result = evaluate_scores(scores, labels, classes, train_counts=train_counts, thresholds=thresholds,
                             groups=groups, prevalence=prevalence, absent=absent_classes, bootstrap=bootstrap)
    result["meta"] = {"checkpoint": str(checkpoint), "kind": kind, "split": split, "views": views,
                      "thresholds_from": tuned_on or "0.5 (no tuning split)",
                      "data": str(score.data)}
    result["unit"] = score.unit
    title = f"{kind} {checkpoint} on {split}" + (f" ({views} views)" if views != "all" else "")
    write_report(out, result, scores=scores, labels=labels, class_names=classes, title=title, ids=ids,
                 id_name=score.id_name, overwrite=overwrite)
    return result
