"""The synthetic demo data and the `chx demo` pipeline (tiny configuration)."""

from __future__ import annotations

import hashlib

import polars as pl
import pytest

from chx.data.demo import CLASS_NAMES, FINDINGS, make_demo_data
from chx.data.manifest import read_manifest, summarize
from helpers import run_chx


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_data_is_deterministic_multiview_and_long_tailed(tmp_path):
    a = make_demo_data(tmp_path / "a", studies=200, seed=3, size=64)
    b = make_demo_data(tmp_path / "b", studies=200, seed=3, size=64)
    c = make_demo_data(tmp_path / "c", studies=200, seed=4, size=64)
    assert digest(a.parent) == digest(b.parent) != digest(c.parent)
    df = read_manifest(a)
    assert read_manifest(b).equals(df)
    s = summarize(df)
    views = df.group_by("study_id").agg(pl.col("view").n_unique().alias("v"), pl.len().alias("n"))
    assert s["studies"] == 200 and 0.6 < s["multi_view_studies"] / 200 < 0.95
    assert (views["n"] == 1).any() and (views["n"] == 3).any()
    assert set(df["view"]) == {"PA", "AP", "LATERAL"}
    pos = [s["positives"][f.name] for f in FINDINGS]
    assert pos[0] > 3 * pos[-1]                      # long tail: head far above the tail
    assert list(df.columns[6:]) == list(CLASS_NAMES)
    assert {f.visible_in for f in FINDINGS} == {"both", "frontal", "lateral"}


def test_chx_demo_runs_end_to_end_and_prints_the_table(capsys, tmp_path):
    code, out, err = run_chx(capsys, "demo", "--out", tmp_path / "demo", "--studies", "60", "--size", "64",
                             "--model", "test_convnext", "--backbone-epochs", "1", "--fusion-epochs", "1",
                             "--workers", "0")
    assert code == 0, err
    assert "| stage-1 mean |" in out and "| stage-1 max |" in out and "| fusion |" in out
    assert "mAP by where a finding is visible" in out and "lateral only" in out and "| frontal |" in out
    assert (tmp_path / "demo" / "fusion" / "best.pt").exists()


def test_view_attribution_per_finding_over_studies_with_both_view_types():
    """`summarise_scores`'s per-finding shares (what the demo test asserts on the findings the model
    learned): the mean over a finding's positive studies that have a frontal and a lateral view;
    a study with one view type does not count, a finding without such a study is absent."""
    from chx.engine.attribution import summarise_scores

    def rec(finding, frontal, both=True):
        return {"finding": finding, "share": {"frontal": frontal, "lateral": 1 - frontal}, "both_types": both,
                "hit": None, "chance": None, "box_chance": None, "view_hits": [], "view_chances": []}

    records = [rec("A", 0.2), rec("A", 0.4), rec("A", 1.0, both=False), rec("B", 0.9), rec("C", 1.0, both=False)]
    per = summarise_scores(records, {"A": "lateral", "B": "frontal", "C": "frontal"})["attribution_per_finding"]
    assert set(per) == {"A", "B"}
    assert per["A"] == {"studies": 2, "lateral share": pytest.approx(0.7), "frontal share": pytest.approx(0.3)}
    assert per["B"] == {"studies": 1, "lateral share": pytest.approx(0.1), "frontal share": pytest.approx(0.9)}


# Issue 25, item 2: the thresholds below hold over the measured spread, not over one or two runs
# (models trained on another CPU or thread count follow another trajectory). The table is in the
# test's docstring; `python benchmarks/demo_spread.py` re-measures it (benchmarks/results/demo_spread.md).
STUDIES, BACKBONE_EPOCHS, FUSION_EPOCHS, EXPLAIN_STUDIES = 1400, 4, 20, 300
GAP_MARGIN = 0.0            # fusion minus every aggregation's one-view mAP (worst run 0.014)
LEARNED_MARGIN = 0.08       # a one-view finding counts as learned: fusion AP above its test prior by this
SHARE_MARGIN = 0.0          # learned one-view findings: attention share on the view showing them above 1/2 (worst 0.512)
POINTING_MARGIN = 0.04      # pointing game: hit rate above chance (worst run 0.075)
THREADS = (1, 2)            # the thread counts measured; more threads would be an unmeasured trajectory


def test_fusion_beats_every_per_study_aggregation_on_findings_visible_in_one_view(tmp_path):
    """Issue 6, item 3: the point of the design. On the demo data, the stage-1 model (trained on
    images labelled with their study's findings) aggregated per study by mean / max / view-weighted
    mean / frontal-only / lateral-only scores below fusion, on the same studies, for the findings whose
    sign is visible in only one view. A smaller run than `chx demo` (64 px), with a large test split
    (840 studies) so that the comparison is not within evaluation noise. Issue 16, item 4: the fusion
    head's attention goes to the view that shows a one-view finding the model learned, and its peak
    falls in the drawn sign's box (one token of tolerance) above chance.

    Spread (`benchmarks/demo_spread.py`, 2026-12-03, 2-core x86-64 CPU; s = data and training seed,
    s0 is this test's configuration; t = OMP_NUM_THREADS and torch threads; explanations on the
    first 300 test studies; "learned": fusion AP above the finding's test prior by LEARNED_MARGIN;
    the last two rows are what was asserted before, pooled over every one-view finding):

    | quantity | s0 t1 | s1 t1 | s2 t1 | s0 t2 | s1 t2 | s2 t2 | min | mean | sd | asserted |
    |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
    | min gap (5 aggregations) | 0.091 | 0.063 | 0.060 | 0.082 | 0.080 | 0.014 | 0.014 | 0.065 | 0.028 | > 0.00 |
    | learned one-view findings | 2 | 2 | 2 | 2 | 2 | 2 | 2 | 2.000 | 0.000 | > 0 |
    | learned: lowest AP - prior | 0.217 | 0.236 | 0.136 | 0.211 | 0.233 | 0.102 | 0.102 | 0.189 | 0.056 | > 0.08 |
    | not learned: highest AP - prior | 0.020 | 0.015 | 0.000 | 0.024 | 0.016 | 0.009 | 0.000 | 0.014 | 0.008 | (< 0.08) |
    | learned: share on the showing view | 0.730 | 0.636 | 0.705 | 0.701 | 0.666 | 0.512 | 0.512 | 0.658 | 0.079 | > 0.50 |
    | pointing game: hit - chance | 0.123 | 0.104 | 0.098 | 0.153 | 0.134 | 0.075 | 0.075 | 0.114 | 0.028 | > 0.04 |
    | all lateral-only: lateral - frontal share | 0.098 | 0.482 | 0.100 | 0.222 | 0.502 | -0.015 | -0.015 | 0.232 | 0.216 | dropped |
    | all frontal-only: frontal - lateral share | 0.391 | 0.058 | 0.366 | 0.287 | 0.086 | 0.032 | 0.032 | 0.203 | 0.163 | dropped |

    Each threshold sits below the worst run: by 0.014 (gap), 0.022 (learned), 0.012 (share), 0.035
    (pointing). The worst run, s2 t2, is an outlier (its fusion attention stayed uniform, ~0.5 on
    every finding, Lung Opacity AP 0.37 against 0.82-0.92); without it the worst runs are 0.060,
    0.136, 0.636 and 0.098. The per-group shares (last rows) depend on whether the rare one-view
    findings, never learned at this size, happen to lean to their view: 0.098 in s0 t1, the failure
    of issue 25; they are no longer asserted. This test runs s0 at 1 or 2 threads (s0 t1, s0 t2).
    """
    import torch

    from chx.data.demo import FINDINGS, read_signs, visibility
    from chx.engine.attribution import FusionExplainer, measure_explanations
    from chx.engine.predictor import Predictor
    from chx.pipeline.demo import DemoConfig, by_visibility, run_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, max(THREADS)))
    try:
        manifest = make_demo_data(tmp_path / "data", studies=STUDIES, seed=0, size=64,
                                  val_fraction=0.1, test_fraction=0.6)
        cfg = DemoConfig(studies=STUDIES, size=64, model="convnext_atto", backbone_epochs=BACKBONE_EPOCHS,
                         fusion_epochs=FUSION_EPOCHS, workers=0, seed=0)   # workers do not change the result
        result = run_demo(tmp_path / "run", cfg, manifest=manifest, images=tmp_path / "data" / "images",
                          echo=lambda *a: None)
        test = read_manifest(manifest).filter(pl.col("split") == "test")
        first = test["study_id"].unique(maintain_order=True).head(EXPLAIN_STUDIES)
        run = tmp_path / "run"
        explainer = FusionExplainer(Predictor.load(backbone=run / "backbone" / "best.pt",
                                                   fusion=run / "fusion" / "best.pt"))
        m = measure_explanations(explainer, test.filter(pl.col("study_id").is_in(first.implode())),
                                 tmp_path / "data" / "images", read_signs(tmp_path / "data" / "signs.parquet"),
                                 visibility())
    finally:
        torch.set_num_threads(threads)

    assert result["split"] == "test"
    table = by_visibility(result["results"], visibility())
    assert set(table) == {"mean", "max", "weighted", "frontal", "lateral"}
    print(result["table"])
    for method, row in table.items():
        stage1, fusion = row["one view"]
        assert fusion > stage1 + GAP_MARGIN, f"{method}: fusion {fusion:.3f} vs stage-1 {stage1:.3f} ({row})"

    # View attribution on the one-view findings the fusion model learned (the others' attention is
    # noise: ~0.5 +- 0.25 per finding and run), pooled over their studies that have both view types.
    per_class, n = result["results"]["fusion"]["per_class"], result["results"]["fusion"]["n_studies"]
    learned = {f.name: f.visible_in for f in FINDINGS if f.visible_in != "both"
               and per_class[f.name]["ap"] > per_class[f.name]["support"] / n + LEARNED_MARGIN}
    assert learned, f"fusion learned no one-view finding: {per_class}"
    shares = {f: m["attribution_per_finding"].get(f, {"studies": 0}) for f in learned}
    studies = sum(s["studies"] for s in shares.values())
    assert studies, f"no explained study with both view types shows {sorted(learned)}"
    own = sum(shares[f]["studies"] * shares[f][f"{where} share"] for f, where in learned.items()) / studies
    assert own > 0.5 + SHARE_MARGIN, (learned, shares)
    assert m["pointing"]["hit rate"] > m["pointing"]["chance"] + POINTING_MARGIN, m
