"""Metrics: NaN-aware per-class AP/AUROC equal scikit-learn's; groups; the class-prior floor."""

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from chx.metrics import group_indices, prior_baseline, summarize


def test_matches_sklearn_on_annotated_rows_and_skips_unscorable_classes():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 4)) < [0.5, 0.2, 0.05, 0.0]).astype(np.float64)
    labels[rng.random((200, 4)) < 0.3] = np.nan
    scores = rng.random((200, 4))
    s = summarize(scores, labels, ["a", "b", "c", "d"], train_counts=np.array([50, 20, 5, 0]))
    for k, name in enumerate("abc"):
        m = ~np.isnan(labels[:, k])
        assert np.isclose(s["per_class"][name]["ap"], average_precision_score(labels[m, k], scores[m, k]))
        assert np.isclose(s["per_class"][name]["auc"], roc_auc_score(labels[m, k], scores[m, k]))
    assert s["skipped"] == ["d"]
    assert np.isclose(s["mAP"], np.mean([s["per_class"][c]["ap"] for c in "abc"]))


def test_groups_by_training_frequency():
    g = group_indices(np.array([5, 100, 50, 1, 70, 3]))
    assert g["head"].tolist() == [1, 4] and g["medium"].tolist() == [2, 0] and g["tail"].tolist() == [5, 3]
    g = group_indices(np.arange(26)[::-1], "cxr-lt")
    assert [len(v) for v in g.values()] == [8, 10, 8]


def test_prior_baseline_is_prevalence_and_half_auc():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, np.nan]], dtype=float)
    b = prior_baseline(np.array([0.3, 0.6]), labels, ["a", "b"])
    assert np.isclose(b["baseline_mAP"], (0.25 + 1 / 3) / 2) and b["baseline_mAUC"] == 0.5
