"""Study-level scores from image-level (stage-1) predictions: the baselines fusion must beat.

Methods: ``mean`` and ``max`` over a study's images; ``weighted``: the reference code's
view-weighted mean (frontal 7, lateral 3, other 5); ``frontal`` / ``lateral``: the mean over only
those views (studies without such a view are left out, so compare on the same studies).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from chx.data.views import FRONTAL_VIEWS, LATERAL_VIEWS

REFERENCE_VIEW_WEIGHTS = {"frontal": 7.0, "lateral": 3.0, "other": 5.0}
METHODS = ("mean", "max", "weighted", "frontal", "lateral")


def _view_group(view: pl.Expr) -> pl.Expr:
    return (pl.when(view.is_in(list(FRONTAL_VIEWS))).then(pl.lit("frontal"))
            .when(view.is_in(list(LATERAL_VIEWS))).then(pl.lit("lateral"))
            .otherwise(pl.lit("other")))


def aggregate_by_study(probs: np.ndarray, study_ids: list[str], views: list[str],
                       method: str = "mean") -> tuple[list[str], np.ndarray]:
    """Aggregate image probabilities [N, K] per study; returns (study ids in first-seen order, [S, K])."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; use one of {METHODS}")
    k = probs.shape[1]
    cols = [f"c{i}" for i in range(k)]
    df = pl.DataFrame({"study_id": study_ids, "view": views}).with_columns(
        _view_group(pl.col("view")).alias("group"))
    df = pl.concat([df, pl.DataFrame(np.asarray(probs, dtype=np.float64), schema=cols)], how="horizontal")
    if method in ("frontal", "lateral"):
        df = df.filter(pl.col("group") == method)
    if method == "weighted":
        w = pl.col("group").replace_strict(REFERENCE_VIEW_WEIGHTS, return_dtype=pl.Float64)
        agg = [((pl.col(c) * w).sum() / w.sum()).alias(c) for c in cols]
    elif method == "max":
        agg = [pl.col(c).max() for c in cols]
    else:
        agg = [pl.col(c).mean() for c in cols]
    out = df.group_by("study_id", maintain_order=True).agg(agg)
    return out["study_id"].to_list(), out.select(cols).to_numpy()
