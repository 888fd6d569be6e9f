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
# What evaluate, compare and training validation group by (prepare's rule); "thirds" / "cxr-lt" on request.
DEFAULT_GROUPS = "prevalence"

# Uncertainty (see "uncertainty" below).
BOOTSTRAP_RESAMPLES = 1000   # the CLI default (--bootstrap); 0 turns the intervals off
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# A row is marked "few positives" when the median number of positives over the classes it scores is
# below this: half of its APs then rest on a handful of positive rows.
FEW_POSITIVES = 5
FLAG_BASELINE = "interval includes the baseline"
FLAG_FEW = f"few positives (median < {FEW_POSITIVES} per class)"


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

    ``groups``: "prevalence" (:data:`DEFAULT_GROUPS`, the rule of chx prepare's summary and of
    :func:`chx.data.classes.prevalence_group`: any class list, as CXR-LT 2024: head above 10 %
    training prevalence, tail below 1 %; needs ``prevalence`` [K] = positives / annotated),
    "thirds" (thirds of the frequency rank), "cxr-lt" (CXR-LT 2023's 8 / 10 / 8 of its 26 classes)
    or explicit sizes.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    k = len(counts)
    order = np.argsort(-counts, kind="stable")
    if groups == "prevalence":
        from chx.data.classes import prevalence_group

        if prevalence is None:
            raise ChxError("--groups prevalence needs the training prevalence of each class, which this "
                           "checkpoint does not record; use --groups thirds")
        of = np.array([prevalence_group(p) for p in np.asarray(prevalence, dtype=np.float64)[order]])
        return {name: order[of == name] for name in GROUP_NAMES}
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
              prevalence: np.ndarray | None = None, absent: str = "skip",
              bootstrap: int | None = None, seed: int = BOOTSTRAP_SEED,
              samples: np.ndarray | None = None) -> dict:
    """Macro mAP / mAUC (+ head/medium/tail mAP when ``train_counts`` is given).

    ``absent``: what a class without a positive among its annotated rows does to the macro means:
    "skip" (left out and listed in ``skipped``; chx's default) or "zero" (its AP counts as 0, as the
    reference code's torchmetrics mAP does: lower whenever such classes exist; for comparison).
    ``bootstrap``: None (training validation) adds nothing; otherwise :func:`uncertainty`'s keys with
    that many resamples (0: the baseline and marks, no intervals); ``samples``: these scores'
    per-class bootstrap APs when already computed (:func:`paired_bootstrap`'s)."""
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
    group_idx = group_indices(train_counts, groups, prevalence) if train_counts is not None else {}
    for name, idx in group_idx.items():
        out[f"mAP_{name}"] = _nanmean(pc["ap"][idx]) if len(idx) else float("nan")
    if bootstrap is not None:
        out.update(uncertainty(scores, labels, group_idx, bootstrap, seed, absent, samples))
    out["per_class"] = {c: {"ap": float(pc["ap"][i]), "auc": float(pc["auc"][i]),
                            "support": int(pc["support"][i])} for i, c in enumerate(class_names)}
    return out


def prior_baseline(prior: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """mAP / mAUC of constant scores (the training class prior for every image): the floor a
    model must beat. A constant score has AP = the class's prevalence and AUROC = 0.5."""
    scores = np.broadcast_to(np.asarray(prior, dtype=np.float64), np.shape(labels))
    s = summarize(scores, labels, class_names)
    return {"baseline_mAP": baseline_map(labels), "baseline_mAUC": s["mAUC"]}


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
                    groups="thirds", prevalence: np.ndarray | None = None, absent: str = "skip",
                    bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The full evaluation record: :func:`summarize`'s keys plus F1, calibration and groups.

    ``scores``/``labels``: [N, K]; ``thresholds``: [K] (None: 0.5 for every class, e.g. when no
    validation split was available to tune them). Adds per class ``f1``, ``threshold``, ``n``
    (annotated rows), ``train_count`` and ``group``; macro ``mF1`` (mean over classes with a
    positive), ``ece``, ``class_names`` and ``groups`` {head/medium/tail: [class names]} by training
    frequency rank (empty lists, and NaN group mAPs, without ``train_counts``); and the uncertainty
    keys of :func:`uncertainty` (``bootstrap`` resamples of the rows; 0: no intervals).
    """
    scores, labels = _as_arrays(scores, labels)
    k = labels.shape[1]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} score columns")
    thresholds = np.full(k, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (k,):
        raise ValueError(f"thresholds {thresholds.shape} must have one value per class ({k})")
    out = summarize(scores, labels, class_names, train_counts, groups, prevalence, absent, bootstrap, seed)
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


# ------------------------------------------------------------------------------ uncertainty
#
# Bootstrap over the evaluated rows (studies for fusion and joint models, images for a backbone):
# each resample draws N rows with replacement (fixed seed), every class is scored on the resample's
# annotated rows as :func:`per_class_scores` scores the data (a class without a positive or a
# negative in a resample is left out of that resample's mean), and the 95 % interval is the 2.5th
# and 97.5th percentile of the resampled mAPs. A paired bootstrap scores two models' predictions of
# the SAME rows on the same resamples, so the interval of their difference excludes the variation
# of the data both share. A resample is a vector of counts per row: AP with row weights equals
# scikit-learn's AP of the rows repeated (tested), computed for all resamples at once in numpy.
# With very few positives per class the percentile interval can even lie beside the point estimate
# (resamples that lose a class's only positives leave it out; repeated positives raise AP): such rows
# carry the "few positives" mark.



def _resample_counts(n: int, resamples: int, seed: int):
    """Chunks of bootstrap resamples of ``n`` rows as counts [b, n] (rows drawn with replacement).
    The chunk size depends on ``n`` only, so a seed gives the same resamples every time."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def weighted_ap(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                absent: str = "skip") -> np.ndarray:
    """AP per class [B, K] for each row weighting ``weights`` [B, N] (bootstrap counts): scikit-learn's
    average precision of the rows repeated ``weights`` times (tied scores form one threshold).
    NaN where a weighting leaves a class without a positive or a negative among its annotated rows
    (``absent="zero"``: 0 where it has no positive, as :func:`summarize` counts it)."""
    scores, labels = _as_arrays(scores, labels)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    out = np.full((len(weights), labels.shape[1]), np.nan)
    for c in range(labels.shape[1]):
        rows = np.flatnonzero(~np.isnan(labels[:, c]))
        if not len(rows):
            if absent == "zero":
                out[:, c] = 0.0
            continue
        order = np.argsort(-scores[rows, c], kind="stable")
        s, y = scores[rows[order], c], labels[rows[order], c] >= 0.5
        ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]       # the last row of each distinct score
        w = weights[:, rows[order]]
        tp = np.cumsum(w * y, axis=1)[:, ends]
        ranked = np.cumsum(w, axis=1)[:, ends]                      # tp + fp
        pos, neg = tp[:, -1], ranked[:, -1] - tp[:, -1]
        precision = np.divide(tp, ranked, out=np.zeros_like(tp), where=ranked > 0)
        gained = np.diff(tp, axis=1, prepend=0.0)                   # positives each threshold adds
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = (gained * precision).sum(axis=1) / pos
        out[:, c] = np.where((pos > 0) & (neg > 0), ap, np.nan)
        if absent == "zero":
            out[:, c] = np.where(pos == 0, 0.0, out[:, c])
    return out


def bootstrap_ap(scores, labels: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, absent: str = "skip") -> np.ndarray:
    """Per-class AP on bootstrap resamples of the rows: [B, K], or [M, B, K] when ``scores`` is a
    list of M score matrices of the same rows (every one scored on the same resamples: paired)."""
    many = isinstance(scores, (list, tuple))
    mats = [_as_arrays(s, labels)[0] for s in (scores if many else [scores])]
    labels = np.asarray(labels, dtype=np.float64)
    parts = [[] for _ in mats]
    for w in _resample_counts(len(labels), resamples, seed):
        for part, s in zip(parts, mats):
            part.append(weighted_ap(s, labels, w, absent))
    out = np.stack([np.concatenate(p) if p else np.zeros((0, labels.shape[1])) for p in parts])
    return out if many else out[0]


def _macro(ap: np.ndarray, classes=None) -> np.ndarray:
    """Mean over the classes scored (not NaN) of the last axis, restricted to index ``classes``."""
    if classes is not None:
        ap = ap[..., np.asarray(classes, dtype=np.int64)]
    with np.errstate(invalid="ignore"):
        n = (~np.isnan(ap)).sum(axis=-1)
        return np.where(n > 0, np.nansum(ap, axis=-1) / np.maximum(n, 1), np.nan)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """[low, high]: the central ``confidence`` percentile interval of the finite samples (NaN, NaN if none)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return [float("nan"), float("nan")]
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_map(scores: np.ndarray, labels: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED, classes=None, absent: str = "skip",
                  confidence: float = CONFIDENCE) -> list[float]:
    """The bootstrap ``confidence`` interval [low, high] of the mAP over class indices ``classes``
    (default: all) of ``scores`` [N, K] against ``labels``, resampling the N rows."""
    return percentile_interval(_macro(bootstrap_ap(scores, labels, resamples, seed, absent), classes), confidence)


def paired_bootstrap(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, classes=None,
                     absent: str = "skip", confidence: float = CONFIDENCE) -> dict:
    """mAP of A minus mAP of B on the same rows: ``diff`` (on all rows) and its paired bootstrap
    interval ``ci`` (both scored on each resample; identical predictions give exactly 0; None with
    0 resamples), and ``samples`` [2, B, K]: A's and B's per-class bootstrap APs."""
    ap = bootstrap_ap([scores_a, scores_b], labels, resamples, seed, absent)
    full = per_class_scores(scores_a, labels)["ap"], per_class_scores(scores_b, labels)["ap"]
    if absent == "zero":
        support = per_class_scores(scores_a, labels)["support"]
        full = tuple(np.where(np.isnan(a) & (support == 0), 0.0, a) for a in full)
    diff = float(_macro(full[0], classes) - _macro(full[1], classes))
    ci = difference_interval(ap, classes, confidence) if resamples > 0 else None
    return {"diff": diff, "ci": ci, "samples": ap}


def difference_interval(samples: np.ndarray, classes=None, confidence: float = CONFIDENCE) -> list[float]:
    """The paired interval of mAP(A) - mAP(B) over class indices ``classes`` from
    :func:`paired_bootstrap`'s ``samples`` [2, B, K] (a subset of classes needs no new resampling)."""
    return percentile_interval(_macro(samples[0], classes) - _macro(samples[1], classes), confidence)


def prevalence_ap(labels: np.ndarray, absent: str = "skip") -> np.ndarray:
    """Per class [K] the AP of an uninformative ranking (constant scores): the class's prevalence
    (positives / annotated rows), NaN where the class is not scored (no positive or no negative;
    0 where it has no positive with ``absent="zero"``), as :func:`summarize` scores the model."""
    labels = np.asarray(labels, dtype=np.float64)
    annotated = (~np.isnan(labels)).sum(axis=0)
    positives = ((labels >= 0.5) & ~np.isnan(labels)).sum(axis=0)
    prev = np.divide(positives, annotated, out=np.full(labels.shape[1], np.nan), where=annotated > 0)
    scored = (positives > 0) & (positives < annotated)
    if absent == "zero":
        return np.where(positives == 0, 0.0, np.where(scored, prev, np.nan))
    return np.where(scored, prev, np.nan)


def baseline_map(labels: np.ndarray, classes=None, absent: str = "skip") -> float:
    """The class-prior baseline of a row: the mAP of an uninformative ranking = the mean prevalence
    over the classes scored (index ``classes``; default all)."""
    return float(_macro(prevalence_ap(labels, absent), classes))


def uncertainty(scores: np.ndarray, labels: np.ndarray, groups: dict[str, np.ndarray] | None = None,
                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                absent: str = "skip", samples: np.ndarray | None = None) -> dict:
    """The uncertainty keys of a record: ``mAP_ci`` (and ``mAP_<group>_ci`` per group of class
    indices; None when ``resamples`` is 0), ``mAP_baseline`` (:func:`baseline_map`),
    ``positives_median`` (over the classes scored), ``flags`` (:data:`FLAG_BASELINE` when the mAP
    interval reaches the baseline, :data:`FLAG_FEW` when ``positives_median`` < :data:`FEW_POSITIVES`)
    and ``bootstrap`` (resamples, seed, confidence). ``samples``: the per-class bootstrap APs [B, K]
    of these scores when already computed with the same resamples."""
    scores, labels = _as_arrays(scores, labels)
    ap = None if resamples <= 0 else samples if samples is not None else bootstrap_ap(
        scores, labels, resamples, seed, absent)
    out = {"mAP_ci": percentile_interval(_macro(ap)) if ap is not None else None}
    for name, idx in (groups or {}).items():
        out[f"mAP_{name}_ci"] = (percentile_interval(_macro(ap, idx)) if ap is not None and len(idx)
                                 else None)
    out["mAP_baseline"] = baseline_map(labels, absent=absent)
    scored = ~np.isnan(prevalence_ap(labels))
    positives = ((labels >= 0.5) & ~np.isnan(labels)).sum(axis=0)[scored]
    out["positives_median"] = float(np.median(positives)) if len(positives) else 0.0
    out["flags"] = flags(out)
    out["bootstrap"] = {"resamples": int(resamples), "seed": int(seed), "confidence": CONFIDENCE}
    return out


def flags(record: dict) -> list[str]:
    """The marks of a record's mAP row (see :func:`uncertainty`)."""
    marks = []
    ci, base = record.get("mAP_ci"), record.get("mAP_baseline")
    if ci is not None and base is not None and not any(_nan(x) for x in (*ci, base)) and ci[0] <= base:
        marks.append(FLAG_BASELINE)
    med = record.get("positives_median")
    if med is not None and med < FEW_POSITIVES:
        marks.append(FLAG_FEW)
    return marks


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
