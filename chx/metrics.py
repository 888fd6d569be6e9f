"""Multi-label metrics for long-tailed data: per-class AP / AUROC, macro means, head/medium/tail.

Labels may hold NaN (not annotated): each class is scored on its annotated rows only. Soft labels
(pseudo labels) are binarised at 0.5. A class without both a positive and a negative among its
annotated rows has no AP/AUROC: it is left out of the macro means and listed in ``skipped``.
AP and AUROC are scikit-learn's ``average_precision_score`` and ``roc_auc_score``.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def per_class_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """AP, AUROC and support per class. ``scores``/``labels``: [N, K]; NaN labels are ignored.

    Returns arrays of length K (NaN where a class cannot be scored) and ``support`` (positives).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    k = labels.shape[1]
    ap = np.full(k, np.nan)
    auc = np.full(k, np.nan)
    support = np.zeros(k, dtype=np.int64)
    for c in range(k):
        annotated = ~np.isnan(labels[:, c])
        y = labels[annotated, c] >= 0.5
        s = scores[annotated, c]
        support[c] = int(y.sum())
        if 0 < y.sum() < len(y):
            ap[c] = average_precision_score(y, s)
            auc[c] = roc_auc_score(y, s)
    return {"ap": ap, "auc": auc, "support": support}


def group_indices(train_counts: np.ndarray, groups: str | tuple[int, ...] = "thirds") -> dict[str, np.ndarray]:
    """Head / medium / tail class indices by training frequency rank.

    ``groups``: "thirds" (default) or "cxr-lt" (8 / 10 / 8, needs 26 classes) or explicit sizes.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    k = len(counts)
    order = np.argsort(-counts, kind="stable")
    if groups == "thirds":
        sizes = (math.ceil(k / 3), k - 2 * math.ceil(k / 3), math.ceil(k / 3))
        if sizes[1] < 0:
            sizes = (k, 0, 0)
    elif groups == "cxr-lt":
        if k != 26:
            raise ValueError(f"the cxr-lt grouping (8/10/8) needs 26 classes, not {k}")
        sizes = (8, 10, 8)
    else:
        sizes = tuple(groups)
        if sum(sizes) != k:
            raise ValueError(f"group sizes {sizes} do not add up to {k} classes")
    bounds = np.cumsum((0, *sizes))
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(("head", "medium", "tail"))}


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def summarize(scores: np.ndarray, labels: np.ndarray, class_names: list[str],
              train_counts: np.ndarray | None = None, groups="thirds") -> dict:
    """Macro mAP / mAUC (+ head/medium/tail mAP when ``train_counts`` is given)."""
    pc = per_class_scores(scores, labels)
    out = {
        "mAP": _nanmean(pc["ap"]),
        "mAUC": _nanmean(pc["auc"]),
        "n": int(len(labels)),
        "skipped": [c for c, a in zip(class_names, pc["ap"]) if np.isnan(a)],
    }
    if train_counts is not None:
        for name, idx in group_indices(train_counts, groups).items():
            out[f"mAP_{name}"] = _nanmean(pc["ap"][idx]) if len(idx) else float("nan")
    out["per_class"] = {c: {"ap": float(pc["ap"][i]), "auc": float(pc["auc"][i]),
                            "support": int(pc["support"][i])} for i, c in enumerate(class_names)}
    return out


def prior_baseline(prior: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """mAP / mAUC of constant scores (the training class prior for every image): the floor a
    model must beat. A constant score has AP = the class's prevalence and AUROC = 0.5."""
    scores = np.broadcast_to(np.asarray(prior, dtype=np.float64), np.shape(labels))
    s = summarize(scores, labels, class_names)
    return {"baseline_mAP": s["mAP"], "baseline_mAUC": s["mAUC"]}
