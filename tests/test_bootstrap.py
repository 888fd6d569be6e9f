"""Issue 32, item 3: bootstrap intervals, the class-prior baseline and row marks (chx.metrics), as
evaluate, compare, evaluate --compare and the demo table show them; item 7: one head/medium/tail
rule and the demo table's bold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from chx.metrics import (BOOTSTRAP_RESAMPLES, FEW_POSITIVES, FLAG_BASELINE, FLAG_FEW, _resample_counts,
                         baseline_map, bootstrap_ap, bootstrap_map, evaluate_scores, group_indices,
                         paired_bootstrap, prior_baseline, summarize, uncertainty, weighted_ap)


def _data(seed: int, n: int = 80, k: int = 4, signal: float = 0.4, rounded: bool = False):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < np.linspace(0.5, 0.1, k)).astype(np.float64)
    scores = np.clip(signal * labels + rng.random((n, k)), 0, 1.4)
    if rounded:                                   # many tied scores
        scores = np.round(scores, 1)
    labels[rng.random((n, k)) < 0.2] = np.nan
    return scores, labels


@pytest.mark.parametrize("seed,rounded", [(0, False), (1, True), (2, True)])
def test_weighted_ap_equals_sklearn_on_the_repeated_rows(seed, rounded):
    """A resample as row counts: AP with weights = scikit-learn's AP of the rows repeated (ties too);
    a class without a positive or a negative in the resample is NaN."""
    scores, labels = _data(seed, n=40, rounded=rounded)
    w = next(_resample_counts(len(labels), 40, seed))
    ap = weighted_ap(scores, labels, w)
    nan_seen = 0
    for b in range(len(w)):
        rows = np.repeat(np.arange(len(labels)), w[b].astype(int))
        for c in range(labels.shape[1]):
            keep = ~np.isnan(labels[rows, c])
            y, s = labels[rows, c][keep], scores[rows, c][keep]
            if 0 < y.sum() < len(y):
                assert np.isclose(ap[b, c], average_precision_score(y, s), atol=1e-12), (b, c)
            else:
                assert np.isnan(ap[b, c])
                nan_seen += 1
    # the full data (every weight 1) is summarize's AP
    full = weighted_ap(scores, labels, np.ones((1, len(labels))))[0]
    s = summarize(scores, labels, list("abcd"))
    assert np.allclose(full, [s["per_class"][c]["ap"] for c in "abcd"], equal_nan=True)


def test_perfect_ranking_gives_the_interval_1_1_and_identical_predictions_a_zero_difference():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [0, 0], [1, np.nan]], dtype=float)
    perfect = labels * 0.8 + 0.1
    perfect = np.nan_to_num(perfect, nan=0.5)
    assert bootstrap_map(perfect, labels, 300) == [1.0, 1.0]
    scores, labels2 = _data(3)
    pair = paired_bootstrap(scores, scores.copy(), labels2, 300)
    assert pair["diff"] == 0.0 and pair["ci"] == [0.0, 0.0]
    # a better model: the paired interval of A - B lies above 0; reversed, below
    better = np.nan_to_num(np.where(np.isnan(labels2), 0.5, labels2) * 2 + scores * 0.1)
    up, down = paired_bootstrap(better, scores, labels2, 300), paired_bootstrap(scores, better, labels2, 300)
    assert up["ci"][0] > 0 and down["ci"][1] < 0 and np.isclose(up["diff"], -down["diff"])


def test_same_seed_same_interval_and_resamples_change_it():
    scores, labels = _data(4)
    a, b = bootstrap_map(scores, labels, 200, seed=7), bootstrap_map(scores, labels, 200, seed=7)
    assert a == b and a[0] < summarize(scores, labels, list("abcd"))["mAP"] < a[1]
    assert bootstrap_map(scores, labels, 200, seed=8) != a
    assert bootstrap_ap(scores, labels, 50).shape == (50, 4)
    assert bootstrap_ap([scores, scores], labels, 50).shape == (2, 50, 4)


def test_paired_interval_covers_a_zero_difference_about_95_percent_of_the_time():
    """Coverage sanity: two models of equal skill (independent noise of the same size), many
    evaluation sets: the paired 95 % interval of their mAP difference covers the true 0 in about
    95 % of the sets (percentile bootstrap on 120 rows: allow 85-100 %)."""
    covered, sets = 0, 80
    for seed in range(sets):
        rng = np.random.default_rng(1000 + seed)
        labels = (rng.random((120, 3)) < [0.4, 0.25, 0.15]).astype(np.float64)
        a = labels * 0.6 + rng.random((120, 3))
        b = labels * 0.6 + rng.random((120, 3))
        lo, hi = paired_bootstrap(a, b, labels, 200, seed=seed)["ci"]
        covered += lo <= 0 <= hi
    assert 0.85 <= covered / sets <= 1.0, covered


def test_mAP_interval_covers_the_population_mAP():
    """Coverage sanity of the single-model interval: the population mAP of a fixed scoring rule
    (estimated on 200,000 rows) is inside the interval of most 150-row evaluation sets."""
    def draw(rng, n):
        labels = (rng.random((n, 2)) < [0.4, 0.2]).astype(np.float64)
        return labels * 0.8 + rng.random((n, 2)), labels
    truth = summarize(*draw(np.random.default_rng(99), 200_000), ["a", "b"])["mAP"]
    covered, sets = 0, 60
    for seed in range(sets):
        lo, hi = bootstrap_map(*draw(np.random.default_rng(seed), 150), 200, seed=seed)
        covered += lo <= truth <= hi
    assert 0.8 <= covered / sets <= 1.0, covered


def test_baseline_is_the_mean_prevalence_of_the_classes_scored_and_the_AP_of_constant_scores():
    labels = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, np.nan, 1]], dtype=float)   # c: no negative
    assert np.isclose(baseline_map(labels), (1 / 4 + 1 / 3) / 2)
    assert np.isclose(baseline_map(labels, classes=[1]), 1 / 3)
    const = summarize(np.full(labels.shape, 0.3), labels, list("abc"))["mAP"]
    assert np.isclose(const, baseline_map(labels))
    assert np.isclose(prior_baseline(np.array([0.1, 0.2, 0.3]), labels, list("abc"))["baseline_mAP"],
                      baseline_map(labels))
    # absent="zero": a class without a positive counts as 0 for the model and the baseline alike
    nopos = np.array([[1, 0], [0, 0], [0, 0]], dtype=float)
    assert baseline_map(nopos, absent="zero") == pytest.approx((1 / 3 + 0) / 2)


def test_marks_interval_at_the_baseline_and_few_positives():
    rng = np.random.default_rng(5)
    labels = (rng.random((200, 3)) < 0.3).astype(np.float64)
    random_scores = rng.random((200, 3))
    u = uncertainty(random_scores, labels, resamples=300)
    assert FLAG_BASELINE in u["flags"] and FLAG_FEW not in u["flags"]
    good = uncertainty(labels * 0.7 + random_scores * 0.5, labels, resamples=300)
    assert good["flags"] == [] and good["mAP_ci"][0] > good["mAP_baseline"]
    # 10 rows with 2, 3 and 6 positives per class: the median (3) is below FEW_POSITIVES
    few = np.zeros((10, 3))
    few[:2, 0], few[:3, 1], few[:6, 2] = 1, 1, 1
    small = uncertainty(few + 0.1 * random_scores[:10], few, resamples=300)
    assert small["positives_median"] == 3 < FEW_POSITIVES and FLAG_FEW in small["flags"]
    few[:5, 1] = 1                                                        # median 5: not marked
    assert FLAG_FEW not in uncertainty(few + 0.1 * random_scores[:10], few, resamples=300)["flags"]
    off = uncertainty(random_scores, labels, resamples=0)
    assert off["mAP_ci"] is None and off["mAP_baseline"] > 0 and off["bootstrap"]["resamples"] == 0


def test_evaluate_scores_record_keeps_its_keys_and_adds_the_interval_keys():
    scores, labels = _data(6, n=120, k=6)
    names = list("abcdef")
    counts, prior = np.array([500, 300, 200, 100, 50, 10]), np.array([0.4, 0.2, 0.1, 0.05, 0.02, 0.005])
    r = evaluate_scores(scores, labels, names, counts, groups="prevalence", prevalence=prior, bootstrap=200)
    for key in ("mAP", "mAUC", "mF1", "ece", "per_class", "groups", "mAP_head", "mAP_tail", "skipped"):
        assert key in r
    assert r["mAP_ci"][0] <= r["mAP"] <= r["mAP_ci"][1]
    assert {"mAP_head_ci", "mAP_medium_ci", "mAP_tail_ci", "mAP_baseline", "flags", "bootstrap"} <= set(r)
    assert r["bootstrap"]["resamples"] == 200
    assert evaluate_scores(scores, labels, names)["bootstrap"]["resamples"] == BOOTSTRAP_RESAMPLES
    assert "mAP_ci" not in summarize(scores, labels, names)     # training validation: unchanged keys


def test_one_head_medium_tail_rule_for_prepare_and_evaluate():
    """Item 7: prepare's summary (frequency_groups) and evaluate's default --groups prevalence are the
    same function: head > 10 %, tail < 1 %, both bounds in medium."""
    from chx.data.classes import frequency_groups, prevalence_group
    from chx.metrics import DEFAULT_GROUPS

    prevalence = np.array([0.5, 0.10, 0.05, 0.01, 0.009, 0.2])
    names = list("abcdef")
    idx = group_indices(np.array([50, 10, 5, 1, 1, 20]), DEFAULT_GROUPS, prevalence)
    by_metrics = {g: sorted(names[i] for i in v) for g, v in idx.items()}
    by_prepare = frequency_groups({n: int(p * 1000) for n, p in zip(names, prevalence)}, dict.fromkeys(names, 1000))
    assert by_metrics == {g: sorted(v) for g, v in by_prepare.items()}
    assert by_metrics == {"head": ["a", "f"], "medium": ["b", "c", "d"], "tail": ["e"]}
    assert [prevalence_group(p) for p in (0.11, 0.1, 0.01, 0.0099)] == ["head", "medium", "medium", "tail"]


def test_cli_defaults_are_the_library_defaults():
    from click.testing import CliRunner

    from chx.cli import cli

    for command in ("evaluate", "compare"):
        text = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output
        assert f"[default: {BOOTSTRAP_RESAMPLES}" in text and "[default: prevalence]" in text, command


def test_demo_table_bolds_the_higher_figure_only_when_the_paired_interval_excludes_0():
    from chx.pipeline.demo import _cell, visibility_table

    assert _cell(0.259, 0.217, None) == "**0.259** vs 0.217"           # the case: stage 1 higher
    assert _cell(0.259, 0.217, [-0.08, -0.01]) == "**0.259** vs 0.217 (Δ [-0.080, -0.010])"
    assert _cell(0.20, 0.30, [0.02, 0.15]).startswith("0.200 vs **0.300**")
    assert "**" not in _cell(0.20, 0.30, [-0.02, 0.15])                 # interval includes 0: no bold
    assert "**" not in _cell(0.093, 0.093, None)                        # equal figures: no bold
    per_class = lambda aps: {c: {"ap": a} for c, a in zip("xyz", aps)}  # noqa: E731
    results = {"stage-1 mean": {"per_class": per_class([0.5, 0.259, 0.3]),
                                "fusion_minus": {"sets": {"lateral": {"mAP_diff_ci": [-0.09, -0.01]}}}},
               "fusion": {"per_class": per_class([0.9, 0.217, 0.3])}}
    table = visibility_table(results, {"x": "both", "y": "lateral", "z": "frontal"})
    assert "**0.259** vs 0.217 (Δ [-0.090, -0.010])" in table and "0.500 vs **0.900**" in table
    assert "0.300 vs 0.300" in table


def test_compare_table_has_intervals_baselines_and_paired_differences(tmp_path):
    """format_table on compare_methods-shaped rows: the interval, baseline, marks and paired columns."""
    from chx.pipeline.compare import format_table

    scores, labels = _data(7, n=60)
    fused = np.where(np.isnan(labels), 0.5, labels) * 0.5 + scores
    pair = paired_bootstrap(fused, scores, labels, 200)
    names = list("abcd")
    s1 = summarize(scores, labels, names, bootstrap=200, samples=pair["samples"][1])
    fs = summarize(fused, labels, names, bootstrap=200, samples=pair["samples"][0])
    assert s1["mAP_ci"] == bootstrap_map(scores, labels, 200)            # the shared resamples are the same
    results = {"stage-1 mean": {**s1, "n_studies": 60, "fusion_minus": {"row": "fusion", "mAP_diff": pair["diff"],
                                                                        "mAP_diff_ci": pair["ci"]}},
               "fusion": {**fs, "n_studies": 60}}
    table = format_table(results)
    assert "| 95 % CI | baseline |" in table and "fusion − method [95 % CI]" in table
    row = next(line for line in table.splitlines() if line.startswith("| stage-1 mean"))
    assert f"[{s1['mAP_ci'][0]:.3f}, {s1['mAP_ci'][1]:.3f}]" in row and f"{pair['diff']:+.3f}" in row
    assert f"{s1['mAP_baseline']:.3f}" in row
    assert "200 resamples" in table and "paired" in table


def test_evaluate_prints_and_writes_the_intervals(capsys, tmp_path, covid_models):
    """chx evaluate's printed summary and metrics.json carry the interval, the baseline and the
    marks; --bootstrap 0 turns the intervals off; evaluate --compare shows them per run."""
    from helpers import run_chx

    out = tmp_path / "eval"
    code, stdout, err = run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store",
                                covid_models["store"], "--split", "val", "--bootstrap", "200", "-o", out)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["bootstrap"]["resamples"] == 200 and len(m["mAP_ci"]) == 2
    assert m["mAP_ci"][0] <= m["mAP"] <= m["mAP_ci"][1] and 0 < m["mAP_baseline"] < 1
    assert isinstance(m["flags"], list) and "mAP" in m and "per_class" in m
    assert "| 95 % CI |" in stdout and f"[{m['mAP_ci'][0]:.3f}, {m['mAP_ci'][1]:.3f}]" in stdout
    assert "mAP baseline (class prior)" in stdout and "200 resamples" in stdout
    assert "| 95 % CI |" in (out / "summary.md").read_text()

    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store",
                           covid_models["store"], "--split", "val", "--bootstrap", "0", "-o", tmp_path / "e0")
    assert code == 0, err
    m0 = json.loads((tmp_path / "e0" / "metrics.json").read_text())
    assert m0["mAP_ci"] is None and m0["mAP"] == m["mAP"] and m0["mAP_baseline"] == m["mAP_baseline"]
    code, table, err = run_chx(capsys, "evaluate", "--compare", out, "--compare", tmp_path / "e0")
    assert code == 0, err
    assert f"| mAP 95 % CI | [{m['mAP_ci'][0]:.3f}, {m['mAP_ci'][1]:.3f}] | n/a |" in table
    assert "| mAP baseline (class prior) |" in table and "| marks |" in table


def test_compare_rows_carry_intervals_and_paired_differences(capsys, tmp_path, covid_models, covid_backbone,
                                                             covid_manifest):
    """chx compare on real images: every row has its interval and baseline, every stage-1 row the
    paired difference to fusion on its studies (also per class subset); the -o JSON keeps them."""
    from helpers import run_chx, shared_path

    out = tmp_path / "cmp.md"
    code, table, err = run_chx(capsys, "compare", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                               "--manifest", covid_manifest, "--images", shared_path("covid-cxr", "images"),
                               "--store", covid_models["store"], "--split", "val", "--bootstrap", "200", "-o", out)
    assert code == 0, err
    results = json.loads(out.with_suffix(".json").read_text())
    assert "| 95 % CI | baseline |" in table and "200 resamples" in table
    for name, r in results.items():
        assert r["mAP_ci"] is None or r["mAP_ci"][0] <= r["mAP"] + 1e-12 <= r["mAP_ci"][1] + 2e-12, name
        assert r["mAP_baseline"] is not None and isinstance(r["flags"], list)
        if name.startswith("stage-1 "):
            d = r["fusion_minus"]
            fused = results[d["row"]]
            assert np.isclose(d["mAP_diff"], fused["mAP"] - r["mAP"]) and fused["n_studies"] == r["n_studies"]
            assert fused["mAP_baseline"] == r["mAP_baseline"]                 # the same studies
            assert d["mAP_diff_ci"] is None or d["mAP_diff_ci"][0] <= d["mAP_diff_ci"][1]

    from chx.pipeline.compare import compare_methods

    classes = list(results["fusion"]["per_class"])
    res = compare_methods(covid_backbone, covid_models["fusion"], covid_manifest, shared_path("covid-cxr", "images"),
                          covid_models["store"], "val", workers=0, bootstrap=100,
                          class_sets={"all": classes, "first two": classes[:2]})
    sets = res["stage-1 mean"]["fusion_minus"]["sets"]
    assert np.isclose(sets["all"]["mAP_diff"], res["stage-1 mean"]["fusion_minus"]["mAP_diff"])
    assert sets["all"]["mAP_diff_ci"] == res["stage-1 mean"]["fusion_minus"]["mAP_diff_ci"]
    assert set(sets) == {"all", "first two"}
