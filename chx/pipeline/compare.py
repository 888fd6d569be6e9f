"""Fusion against the stage-1 model's per-study aggregations, on the same split and studies; and an
ensemble's members against the ensemble (:func:`compare_ensemble`).

Stage-1 image probabilities (with hflip TTA when the backbone was trained with it) are aggregated
per study by each method of :mod:`chx.pipeline.aggregate`; the fusion model predicts the same
studies from the store (with hflip TTA when the store holds flipped maps, as `chx evaluate` and
`chx predict` do). Every method is scored on the studies it can score (frontal-only and
lateral-only skip studies without such a view), and fusion is also scored on those same subsets,
so each comparison is like for like.

Every row has its bootstrap 95 % mAP interval over its studies, its class-prior baseline and its
marks (:func:`chx.metrics.uncertainty`); every stage-1 row also has the paired bootstrap interval of
fusion minus that aggregation on the same studies and resamples (``fusion_minus``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.data.datasets import ImageDataset
from chx.data.image_cache import open_image_cache
from chx.data.manifest import class_columns, read_manifest
from chx.data.transforms import Preprocess
from chx.engine.compat import check_fusion_store, require_same_classes
from chx.engine.inference import load_backbone, predict_images, store_study_probs
from chx.errors import ChxError
from chx.metrics import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, DEFAULT_GROUPS, FEW_POSITIVES, difference_interval,
                         paired_bootstrap, summarize)
from chx.models import load_checkpoint, load_model
from chx.options import CompareOptions
from chx.pipeline.aggregate import METHODS, aggregate_by_study
from chx.pipeline.report import fmt, fmt_ci


def compare_methods(backbone: Path, fusion: Path, manifest: Path, images: Path, store: str,
                    split: str = CompareOptions.split, *, workers: int = CompareOptions.workers,
                    batch_size: int = CompareOptions.batch_size,
                    groups=DEFAULT_GROUPS, bootstrap: int = BOOTSTRAP_RESAMPLES,
                    class_sets: dict[str, list[str]] | None = None,
                    images_cache: str | None = None) -> dict[str, dict]:
    """Return {method: metrics summary (+ ``n_studies``)} for the stage-1 aggregations and fusion.

    With ``bootstrap`` resamples of the studies (0: no intervals) each summary has
    :func:`chx.metrics.uncertainty`'s keys, and each stage-1 row ``fusion_minus``: {"row": the fusion
    row on the same studies, "mAP_diff": its mAP minus this row's, "mAP_diff_ci": the paired interval,
    "sets": the same per named subset of ``class_sets`` (over its classes scored on these studies)}."""
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
    images_set = ImageDataset(df, images, pre, train=False, classes=classes, cache=open_image_cache(images_cache, pre))
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
        s1, fs = np.stack([s for _, s in ids_scores]), fprobs[[fusion_by_id[i] for i in ids]]
        pair = paired_bootstrap(fs, s1, labels, bootstrap, BOOTSTRAP_SEED)   # both on the same resamples
        stage1 = summarize(s1, labels, classes, train_counts, groups, prevalence, bootstrap=bootstrap,
                           samples=pair["samples"][1])
        fused = summarize(fs, labels, classes, train_counts, groups, prevalence, bootstrap=bootstrap,
                          samples=pair["samples"][0])
        fusion_row = f"fusion (on {method} studies)" if method in ("frontal", "lateral") else "fusion"
        sets = {}
        for set_name, members in (class_sets or {}).items():
            idx = [classes.index(c) for c in members if not np.isnan(stage1["per_class"][c]["ap"])]
            sets[set_name] = {"mAP_diff": float(np.mean([fused["per_class"][classes[i]]["ap"] for i in idx])
                                                - np.mean([stage1["per_class"][classes[i]]["ap"] for i in idx]))
                              if idx else float("nan"),
                              "mAP_diff_ci": difference_interval(pair["samples"], idx)
                              if idx and bootstrap > 0 else None}
        results[f"stage-1 {method}"] = {**stage1, "n_studies": len(ids), "unit": "studies",
                                        "fusion_minus": {"row": fusion_row, "mAP_diff": pair["diff"],
                                                         "mAP_diff_ci": pair["ci"], "sets": sets}}
        fused_results[fusion_row] = {**fused, "n_studies": len(ids), "unit": "studies"}
    return {**results, **fused_results}


def compare_ensemble(ensemble: Path, manifest: Path | None, images: Path | None, split: str = CompareOptions.split,
                     *, workers: int = CompareOptions.workers, batch_size: int = CompareOptions.batch_size,
                     bootstrap: int = BOOTSTRAP_RESAMPLES, images_cache: str | None = None,
                     device: str = "auto") -> dict[str, dict]:
    """Every member of an ensemble bundle against the ensemble on the same studies of ``split``:
    {member name: summary + ``ensemble_minus`` (the ensemble's mAP minus the member's, with its
    paired bootstrap interval: both scored on the same resampled studies), "ensemble": summary}.
    Each summary has the bootstrap interval of its mAP, its class-prior baseline and its marks."""
    from chx.engine.ensemble import EnsemblePredictor

    ens, df, images = EnsemblePredictor.on_manifest(ensemble, manifest, images, images_cache, split, device=device)
    per, combined, labels, ids = ens.score_split(df, split, images, batch_size=batch_size, workers=workers)
    if not ids:
        raise ChxError(f"split {split!r} is empty")
    classes, results, samples = list(ens.class_names), {}, None
    for name, scores in zip(row_names(ens.names), per):
        pair = paired_bootstrap(combined, scores, labels, bootstrap, BOOTSTRAP_SEED)   # same resamples for all
        samples = pair["samples"][0]
        row = summarize(scores, labels, classes, bootstrap=bootstrap, samples=pair["samples"][1])
        results[name] = {**row, "n_studies": len(ids), "unit": "studies",
                         "ensemble_minus": {"row": "ensemble", "mAP_diff": pair["diff"], "mAP_diff_ci": pair["ci"]}}
    results["ensemble"] = {**summarize(combined, labels, classes, bootstrap=bootstrap, samples=samples),
                           "n_studies": len(ids), "unit": "studies"}
    return results


def row_names(names: list[str]) -> list[str]:
    """Members' names as distinct row names: a name given twice (members in two folders of the same
    name) or named "ensemble" gets its member number."""
    return [n if names.count(n) == 1 and n != "ensemble" else f"{n} (member {i + 1})" for i, n in enumerate(names)]


MARK_SYMBOLS = {"interval includes the baseline": "≈ baseline", "few positives": "few positives"}


def _marks(r: dict) -> str:
    return ", ".join(next((v for k, v in MARK_SYMBOLS.items() if f.startswith(k)), f)
                     for f in r.get("flags") or []) or ""


def format_table(results: dict[str, dict], title: str = "", versus: str = "fusion") -> str:
    """A Markdown table per method: mAP with its 95 % interval, the class-prior baseline, mAUC,
    head-medium-tail mAP, ``versus`` (fusion, or the ensemble of :func:`compare_ensemble`) minus the
    method (paired interval) and the row's marks; then a line saying how the intervals were computed
    and what the marks mean."""
    what = "method" if versus == "fusion" else "member"
    lines = [title] if title else []
    lines += [f"| {what} | studies | mAP | 95 % CI | baseline | mAUC | mAP head | mAP medium | mAP tail "
              f"| {versus} − {what} [95 % CI] | marks |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        d = r.get(f"{versus}_minus")
        diff = (f"{d['mAP_diff']:+.3f} {fmt_ci(d['mAP_diff_ci'])}" if d and d.get("mAP_diff_ci") is not None
                else f"{d['mAP_diff']:+.3f}" if d else "")
        lines.append(f"| {name} | {r['n_studies']} | {fmt(r['mAP'])} | {fmt_ci(r.get('mAP_ci'))} | "
                     f"{fmt(r.get('mAP_baseline'))} | {fmt(r['mAUC'])} | "
                     f"{fmt(r.get('mAP_head'))} | {fmt(r.get('mAP_medium'))} | {fmt(r.get('mAP_tail'))} | "
                     f"{diff} | {_marks(r)} |")
    boot = next((r.get("bootstrap") for r in results.values() if r.get("bootstrap")), None) or {}
    how = (f"95 % intervals: bootstrap over each row's studies ({boot['resamples']} resamples, seed "
           f"{boot.get('seed', 0)}; {versus} − {what} is paired: both scored on the same resampled studies)"
           if boot.get("resamples") else "no intervals (--bootstrap 0)")
    lines += ["", f"{how}. baseline: the class-prior mAP of the row's studies (an uninformative ranking "
                  f"scores each class's prevalence). Marks: ≈ baseline (the interval reaches the baseline), "
                  f"few positives (the median class scored has fewer than {FEW_POSITIVES} positive studies)."]
    return "\n".join(lines)

