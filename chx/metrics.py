"""Multi-label metrics for long-tailed data: per-class AP / AUROC, macro means, head/medium/tail.

Labels may hold NaN (not annotated): each class is scored on its annotated rows only. Soft labels
(pseudo labels) are binarised at 0.5. A class without both a positive and a negative among its
annotated rows has no AP/AUROC: it is left out of the macro means and listed in ``skipped``.
AP and AUROC are scikit-learn's ``average_precision_score`` and ``roc_auc_score``.

F1 needs a decision threshold per class: :func:`tune_thresholds` picks them on validation rows,
:func:`f1_at` applies them (predicted positive = score >= threshold). :func:`calibration` pools every
annotated (image, class) pair into one reliability curve and its expected calibration error.
:func:`evaluate_scores` is the full evaluation record that ``chx evaluate`` writes.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from chx.errors import ChxError

GROUP_NAMES = ("head", "medium", "tail")


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


def group_indices(train_counts: np.ndarray, groups: str | tuple[int, ...] = "thirds",
                  prevalence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Head / medium / tail class indices by training frequency.

    ``groups``: "thirds" (default: thirds of the frequency rank), "cxr-lt" (CXR-LT 2023's 8 / 10 / 8
    of its 26 classes), "prevalence" (any class list, as CXR-LT 2024: head above 10 % training
    prevalence, tail below 1 %; needs ``prevalence`` [K] = positives / annotated) or explicit sizes.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    k = len(counts)
    order = np.argsort(-counts, kind="stable")
    if groups == "prevalence":
        from chx.data.classes import HEAD_MIN_PREVALENCE, TAIL_MAX_PREVALENCE

        if prevalence is None:
            raise ChxError("--groups prevalence needs the training prevalence of each class, which this "
                           "checkpoint does not record; use --groups thirds")
        p = np.asarray(prevalence, dtype=np.float64)[order]
        return {"head": order[p > HEAD_MIN_PREVALENCE],
                "medium": order[(p <= HEAD_MIN_PREVALENCE) & (p >= TAIL_MAX_PREVALENCE)],
                "tail": order[p < TAIL_MAX_PREVALENCE]}
    if groups == "thirds":
        sizes = (math.ceil(k / 3), k - 2 * math.ceil(k / 3), math.ceil(k / 3))
        if sizes[1] < 0:
            sizes = (k, 0, 0)
    elif groups == "cxr-lt":
        if k != 26:
            raise ChxError(f"--groups cxr-lt is CXR-LT 2023's 8/10/8 split of its 26 classes; these are {k} "
                           f"classes: use --groups prevalence (or thirds)")
        sizes = (8, 10, 8)
    else:
        sizes = tuple(groups)
        if sum(sizes) != k:
            raise ValueError(f"group sizes {sizes} do not add up to {k} classes")
    bounds = np.cumsum((0, *sizes))
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(GROUP_NAMES)}


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


ABSENT_CLASSES = ("skip", "zero")


def summarize(scores: np.ndarray, labels: np.ndarray, class_names: list[str],
              train_counts: np.ndarray | None = None, groups="thirds",
              prevalence: np.ndarray | None = None, absent: str = "skip") -> dict:
    """Macro mAP / mAUC (+ head/medium/tail mAP when ``train_counts`` is given).

    ``absent``: what a class without a positive among its annotated rows does to the macro means:
    "skip" (left out and listed in ``skipped``; chx's default) or "zero" (its AP counts as 0, as the
    reference code's torchmetrics mAP does: lower whenever such classes exist; for comparison)."""
    if absent not in ABSENT_CLASSES:
        raise ValueError(f"absent must be one of {ABSENT_CLASSES}, not {absent!r}")
    pc = per_class_scores(scores, labels)
    if absent == "zero":
        pc["ap"] = np.where(np.isnan(pc["ap"]) & (pc["support"] == 0), 0.0, pc["ap"])
    out = {
        "mAP": _nanmean(pc["ap"]),
        "mAUC": _nanmean(pc["auc"]),
        "n": int(len(labels)),
        "skipped": [c for c, a in zip(class_names, pc["ap"]) if np.isnan(a)],
    }
    if train_counts is not None:
        for name, idx in group_indices(train_counts, groups, prevalence).items():
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


def _annotated(scores: np.ndarray, labels: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ``c``'s annotated rows: (binary labels [n] bool, scores [n] float64)."""
    annotated = ~np.isnan(labels[:, c])
    return labels[annotated, c] >= 0.5, scores[annotated, c]


def _as_arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N, K]")
    return scores, labels


def tune_thresholds(scores: np.ndarray, labels: np.ndarray, method: str = "max-f1") -> np.ndarray:
    """Per-class decision thresholds [K] chosen on the given (validation) rows.

    ``method``: "max-f1" (the threshold with the highest F1) or "youden" (the highest TPR - FPR).
    Each threshold is one of the class's scores, so "score >= threshold" reproduces the optimum.
    A class without a positive (or, for "youden", without a negative) among its annotated rows
    gets 0.5. Ties go to the lowest threshold (max-f1) or the highest (youden).
    """
    if method not in ("max-f1", "youden"):
        raise ValueError(f"unknown threshold method {method!r}; use 'max-f1' or 'youden'")
    scores, labels = _as_arrays(scores, labels)
    k = labels.shape[1]
    out = np.full(k, 0.5)
    for c in range(k):
        y, s = _annotated(scores, labels, c)
        if not y.any() or (method == "youden" and y.all()):
            continue
        if method == "max-f1":
            precision, recall, thr = precision_recall_curve(y, s)
            p, r = precision[:-1], recall[:-1]   # the last point (recall 0) has no threshold
            denom = p + r
            f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
            out[c] = thr[int(np.argmax(f1))]
        else:
            fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
            j = (tpr - fpr)[1:]                  # thr[0] is +inf: nothing predicted positive
            out[c] = thr[1:][int(np.argmax(j))]
    return out


def f1_at(scores: np.ndarray, labels: np.ndarray, thresholds) -> np.ndarray:
    """F1 per class [K] with predicted positive = score >= threshold (``thresholds``: scalar or [K]).

    NaN where a class has no positive among its annotated rows.
    """
    scores, labels = _as_arrays(scores, labels)
    k = labels.shape[1]
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (k,))
    out = np.full(k, np.nan)
    for c in range(k):
        y, s = _annotated(scores, labels, c)
        if not y.any():
            continue
        pred = s >= thresholds[c]
        tp = int((pred & y).sum())
        out[c] = 2 * tp / (2 * tp + int((pred & ~y).sum()) + int((~pred & y).sum()))
    return out


def calibration(scores: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Reliability over all annotated (image, class) pairs, pooled, in ``bins`` equal-width bins.

    Bin i holds probabilities in [i/bins, (i+1)/bins) (the last bin also holds 1.0). Returns
    ``ece`` (sum over bins of count/total * |accuracy - confidence|; NaN when nothing is annotated),
    ``edges`` [bins + 1], and per bin ``confidence`` (mean probability), ``accuracy`` (observed
    positive rate; both NaN for an empty bin) and ``count``.
    """
    scores, labels = _as_arrays(scores, labels)
    annotated = ~np.isnan(labels)
    p = np.clip(scores[annotated], 0.0, 1.0)
    y = (labels[annotated] >= 0.5).astype(np.float64)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=p, minlength=bins) / count
        accuracy = np.bincount(idx, weights=y, minlength=bins) / count
    filled = count > 0
    ece = (float(np.sum(count[filled] / count.sum() * np.abs(accuracy[filled] - confidence[filled])))
           if filled.any() else float("nan"))
    return {"ece": ece, "edges": np.linspace(0.0, 1.0, bins + 1), "confidence": confidence,
            "accuracy": accuracy, "count": count}


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, class_names: list[str],
                    train_counts: np.ndarray | None = None, thresholds: np.ndarray | None = None,
                    groups="thirds", prevalence: np.ndarray | None = None, absent: str = "skip") -> dict:
    """The full evaluation record: :func:`summarize`'s keys plus F1, calibration and groups.

    ``scores``/``labels``: [N, K]; ``thresholds``: [K] (None: 0.5 for every class, e.g. when no
    validation split was available to tune them). Adds per class ``f1``, ``threshold``, ``n``
    (annotated rows), ``train_count`` and ``group``; macro ``mF1`` (mean over classes with a
    positive), ``ece``, ``class_names`` and ``groups`` {head/medium/tail: [class names]} by training
    frequency rank (empty lists, and NaN group mAPs, without ``train_counts``).
    """
    scores, labels = _as_arrays(scores, labels)
    k = labels.shape[1]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} score columns")
    thresholds = np.full(k, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (k,):
        raise ValueError(f"thresholds {thresholds.shape} must have one value per class ({k})")
    out = summarize(scores, labels, class_names, train_counts, groups, prevalence, absent)
    out["absent_classes"] = absent
    f1 = f1_at(scores, labels, thresholds)
    n_annotated = (~np.isnan(labels)).sum(axis=0)
    group_of: dict[str, str | None] = dict.fromkeys(class_names)
    out["groups"] = {name: [] for name in GROUP_NAMES}
    if train_counts is not None:
        train_counts = np.asarray(train_counts)
        for name, idx in group_indices(train_counts, groups, prevalence).items():
            out["groups"][name] = [class_names[i] for i in idx]
            group_of.update(dict.fromkeys(out["groups"][name], name))
    else:
        out.update({f"mAP_{name}": float("nan") for name in GROUP_NAMES})
    out["mF1"] = _nanmean(f1)
    out["ece"] = calibration(scores, labels)["ece"]
    out["class_names"] = list(class_names)
    for i, c in enumerate(class_names):
        out["per_class"][c].update({
            "f1": float(f1[i]), "threshold": float(thresholds[i]), "n": int(n_annotated[i]),
            "train_count": None if train_counts is None else int(train_counts[i]), "group": group_of[c]})
    return out


def classes_by_frequency(result: dict) -> list[str]:
    """Class names of an :func:`evaluate_scores` record (or its JSON) by training count, most
    frequent first; the record's own order when training counts are unknown."""
    per_class = result["per_class"]
    names = list(per_class)
    counts = [per_class[c].get("train_count") for c in names]
    if any(n is None for n in counts):
        return names
    order = np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")
    return [names[i] for i in order]
