"""Metrics: NaN-aware per-class AP/AUROC equal scikit-learn's; groups; the class-prior floor."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from chx.metrics import (calibration, evaluate_scores, f1_at, group_indices, prior_baseline, summarize,
                         tune_thresholds)


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


def _brute_force_f1(y, s):
    """{threshold: F1} for every unique score as threshold (predicted positive = score >= t)."""
    from sklearn.metrics import f1_score
    return {t: f1_score(y, s >= t) for t in np.unique(s)}


def test_tune_thresholds_max_f1_is_the_brute_force_optimum_on_annotated_rows():
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 3)) < [0.5, 0.2, 0.0]).astype(np.float64)
    scores = np.clip(labels * 0.3 + rng.random((60, 3)) * 0.7, 0, 1)
    labels[rng.random((60, 3)) < 0.25] = np.nan
    t = tune_thresholds(scores, labels)
    for k in range(2):
        m = ~np.isnan(labels[:, k])
        f1s = _brute_force_f1(labels[m, k] == 1, scores[m, k])
        assert np.isclose(f1s[t[k]], max(f1s.values()))
    assert t[2] == 0.5                                      # no positive: the default
    # a hand example: 0.8 keeps both positives and drops the 0.7 negative -> F1 = 1
    y = np.array([[0], [0], [1], [0], [1], [np.nan]], dtype=float)
    s = np.array([[0.1], [0.5], [0.8], [0.7], [0.9], [0.95]])
    assert tune_thresholds(s, y)[0] == 0.8
    assert tune_thresholds(s, y, "youden")[0] == 0.8


def test_tune_thresholds_youden_maximises_tpr_minus_fpr():
    rng = np.random.default_rng(2)
    labels = (rng.random((80, 2)) < [0.3, 1.0]).astype(np.float64)
    scores = np.clip(labels * 0.2 + rng.random((80, 2)) * 0.8, 0, 1)
    labels[rng.random((80, 2)) < 0.2] = np.nan
    t = tune_thresholds(scores, labels, method="youden")
    m = ~np.isnan(labels[:, 0])
    y, s = labels[m, 0] == 1, scores[m, 0]

    def youden(th):
        return (s[y] >= th).mean() - (s[~y] >= th).mean()
    assert np.isclose(youden(t[0]), max(youden(th) for th in np.unique(s)))
    assert t[1] == 0.5                                      # no negative: the default


def test_f1_at_equals_sklearn_and_is_nan_without_positives():
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(3)
    labels = (rng.random((100, 3)) < [0.4, 0.1, 0.0]).astype(np.float64)
    labels[rng.random((100, 3)) < 0.3] = np.nan
    scores = rng.random((100, 3))
    th = np.array([0.3, 0.6, 0.5])
    f1 = f1_at(scores, labels, th)
    for k in range(2):
        m = ~np.isnan(labels[:, k])
        assert np.isclose(f1[k], f1_score(labels[m, k] == 1, scores[m, k] >= th[k]))
    assert np.isnan(f1[2])


def test_calibration_ece_by_hand_ignoring_unannotated_pairs():
    # bin [0.0, 0.5): 0.1 (neg), 0.3 (pos) -> conf 0.2, acc 0.5; bin [0.5, 1]: 0.6 (pos), 0.8 (pos)
    # -> conf 0.7, acc 1.0. ECE = 2/4 * 0.3 + 2/4 * 0.3 = 0.3. The unannotated last row is ignored.
    scores = np.array([[0.1, 0.6], [0.3, 0.8], [0.99, 0.05]])
    labels = np.array([[0, 1], [1, 1], [np.nan, np.nan]])
    cal = calibration(scores, labels, bins=2)
    assert np.isclose(cal["ece"], 0.3)
    assert cal["count"].tolist() == [2, 2]
    assert np.allclose(cal["confidence"], [0.2, 0.7]) and np.allclose(cal["accuracy"], [0.5, 1.0])


def test_evaluate_scores_extends_summarize_and_ignores_nan_labels():
    rng = np.random.default_rng(4)
    labels = (rng.random((150, 6)) < [0.5, 0.3, 0.2, 0.1, 0.05, 0.0]).astype(np.float64)
    labels[rng.random((150, 6)) < 0.3] = np.nan
    scores = rng.random((150, 6))
    names = list("abcdef")
    counts = np.array([500, 300, 200, 100, 50, 10])
    r = evaluate_scores(scores, labels, names, counts, thresholds=np.full(6, 0.4))
    s = summarize(scores, labels, names, counts)
    for key in ("mAP", "mAUC", "mAP_head", "mAP_medium", "mAP_tail", "n", "skipped"):
        assert r[key] == s[key]
    assert r["groups"] == {"head": ["a", "b"], "medium": ["c", "d"], "tail": ["e", "f"]}
    f1 = f1_at(scores, labels, 0.4)
    assert np.isclose(r["mF1"], np.nanmean(f1)) and np.isnan(r["per_class"]["f"]["f1"])
    assert r["per_class"]["a"]["n"] == int((~np.isnan(labels[:, 0])).sum())
    assert r["per_class"]["e"]["group"] == "tail" and r["per_class"]["e"]["train_count"] == 50
    assert np.isclose(r["ece"], calibration(scores, labels)["ece"])
    # the unannotated pairs do not matter: any scores there give the same record
    scrambled = np.where(np.isnan(labels), rng.random(labels.shape), scores)
    r2 = evaluate_scores(scrambled, labels, names, counts, thresholds=np.full(6, 0.4))
    assert r2["mAP"] == r["mAP"] and r2["mF1"] == r["mF1"] and r2["ece"] == r["ece"]
    # without training counts: no groups, 0.5 thresholds
    r3 = evaluate_scores(scores, labels, names)
    assert r3["groups"] == {"head": [], "medium": [], "tail": []} and np.isnan(r3["mAP_head"])
    assert r3["per_class"]["a"]["threshold"] == 0.5 and r3["per_class"]["a"]["train_count"] is None


def test_absent_classes_zero_counts_a_class_without_positives_as_ap_0():
    """The reference's torchmetrics mAP counts a class without positives as AP 0; chx leaves it out
    by default and offers "zero" for comparison."""
    from chx.metrics import summarize

    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=np.float64)   # class b: no positive
    scores = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.7, 0.2, 0.1], [0.1, 0.4, 0.9]])
    skip = summarize(scores, labels, ["a", "b", "c"])
    zero = summarize(scores, labels, ["a", "b", "c"], absent="zero")
    assert skip["mAP"] == 1.0 and skip["skipped"] == ["b"]
    assert zero["mAP"] == 2 / 3


def test_group_choices_that_do_not_fit_the_classes_are_user_errors():
    """One check for evaluate and compare alike: a one-line error, not a traceback."""
    from chx.errors import ChxError

    with pytest.raises(ChxError, match="--groups cxr-lt is CXR-LT 2023's 8/10/8 split of its 26 classes"):
        group_indices(np.arange(14), "cxr-lt")
    with pytest.raises(ChxError, match="--groups prevalence needs the training prevalence"):
        group_indices(np.arange(14), "prevalence")
