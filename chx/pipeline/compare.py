"""Fusion against the stage-1 model's per-study aggregations, on the same split and studies.

Stage-1 image probabilities (with hflip TTA when the backbone was trained with it) are aggregated
per study by each method of :mod:`chx.pipeline.aggregate`; the fusion model predicts the same
studies from the store (with hflip TTA when the store holds flipped maps, as `chx evaluate` and
`chx predict` do). Every method is scored on the studies it can score (frontal-only and
lateral-only skip studies without such a view), and fusion is also scored on those same subsets,
so each comparison is like for like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.data.datasets import ImageDataset
from chx.data.manifest import class_columns, read_manifest
from chx.data.transforms import Preprocess
from chx.engine.compat import check_fusion_store, require_same_classes
from chx.engine.inference import load_backbone, predict_images, store_study_probs
from chx.errors import ChxError
from chx.metrics import summarize
from chx.models import load_checkpoint, load_model
from chx.pipeline.aggregate import METHODS, aggregate_by_study
from chx.pipeline.report import fmt


def compare_methods(backbone: Path, fusion: Path, manifest: Path, images: Path, store: str,
                    split: str = "val", *, workers: int = 2, batch_size: int = 16,
                    groups="thirds") -> dict[str, dict]:
    """Return {method: metrics summary (+ ``n_studies``)} for the stage-1 aggregations and fusion."""
    model, bckpt = load_backbone(backbone)
    fckpt = load_checkpoint(fusion, kind="fusion")
    df = read_manifest(manifest).filter(pl.col("split") == split)
    if df.height == 0:
        raise ChxError(f"{manifest} has no images in split {split!r}")
    classes = class_columns(df)
    require_same_classes(classes, bckpt["class_names"], str(manifest), str(backbone))
    require_same_classes(fckpt["class_names"], bckpt["class_names"], str(fusion), str(backbone))
    check_fusion_store(fckpt, fusion, store)
    train_counts = np.asarray(fckpt.get("train_counts") or bckpt["train_counts"])
    prevalence = np.asarray(fckpt.get("class_prior") or bckpt["class_prior"])

    pre = Preprocess.from_dict(bckpt["preprocess"])
    images_set = ImageDataset(df, images, pre, train=False, classes=classes)
    probs = predict_images(model, images_set, batch_size=batch_size, workers=workers,
                          tta=bool(bckpt.get("tta", True)), desc=f"stage 1 on {split}")

    fprobs, studies = store_study_probs(load_model(fckpt, kind="fusion"), store, split, batch_size=batch_size)
    if fprobs is None:
        raise ChxError(f"store {store} has no study in split {split!r}")
    fusion_by_id = dict(zip(studies.study_ids, range(len(studies))))
    labels_by_id = dict(zip(studies.study_ids, studies.labels))

    results, fused_results = {}, {}
    for method in METHODS:
        ids, scores = aggregate_by_study(probs, df["study_id"].to_list(), df["view"].to_list(), method)
        ids_scores = [(i, s) for i, s in zip(ids, scores) if i in fusion_by_id]
        if not ids_scores:
            continue
        ids = [i for i, _ in ids_scores]
        labels = np.stack([labels_by_id[i] for i in ids])
        stage1 = summarize(np.stack([s for _, s in ids_scores]), labels, classes, train_counts, groups, prevalence)
        fused = summarize(fprobs[[fusion_by_id[i] for i in ids]], labels, classes, train_counts, groups, prevalence)
        results[f"stage-1 {method}"] = {**stage1, "n_studies": len(ids)}
        fused_results[f"fusion (on {method} studies)" if method in ("frontal", "lateral") else "fusion"] = \
            {**fused, "n_studies": len(ids)}
    return {**results, **fused_results}


def format_table(results: dict[str, dict], title: str = "") -> str:
    """A Markdown table of mAP / mAUC / head-medium-tail mAP per method."""
    lines = [title] if title else []
    lines += ["| method | studies | mAP | mAUC | mAP head | mAP medium | mAP tail |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n_studies']} | {fmt(r['mAP'])} | {fmt(r['mAUC'])} | "
                     f"{fmt(r.get('mAP_head'))} | {fmt(r.get('mAP_medium'))} | {fmt(r.get('mAP_tail'))} |")
    return "\n".join(lines)

