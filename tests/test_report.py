"""The evaluation report: files written atomically, JSON-safe metrics, plots that open, run comparison."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from chx.errors import ChxError
from chx.metrics import evaluate_scores, tune_thresholds
from chx.pipeline.report import compare_runs, summary_table, write_report

NAMES = ["Effusion", "Atelectasis", "Cardiomegaly", "Nodule", "Pneumothorax", "Hernia"]
TRAIN_COUNTS = np.array([900, 700, 400, 150, 60, 5])


def _example(seed: int):
    """200 x 6: informative scores, ~20 % unannotated pairs, and a last class with no positive."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((200, 6)) < [0.4, 0.3, 0.2, 0.1, 0.05, 0.0]).astype(np.float64)
    scores = np.clip(0.35 * labels + 0.65 * rng.random((200, 6)), 0, 1)
    labels[rng.random((200, 6)) < 0.2] = np.nan
    thresholds = tune_thresholds(scores[:100], labels[:100])
    result = evaluate_scores(scores[100:], labels[100:], NAMES, TRAIN_COUNTS, thresholds)
    return scores[100:], labels[100:], result


@pytest.fixture
def two_runs(tmp_path):
    runs = []
    for seed, name in ((0, "baseline"), (1, "fusion")):
        _, _, result = _example(seed)
        write_report(tmp_path / name, result, title=name)   # no plots: compare reads metrics.json only
        runs.append(tmp_path / name)
    return runs


def test_write_report_writes_json_csv_markdown_and_plots(tmp_path):
    scores, labels, result = _example(0)
    paths = write_report(tmp_path / "eval", result, scores=scores, labels=labels, class_names=NAMES,
                         title="fusion on test")
    assert set(paths) == {"metrics", "per_class", "summary", "ap_per_class", "pr_curves", "reliability"}
    assert all(p.parent == tmp_path / "eval" for p in paths.values())
    assert not list((tmp_path / "eval").glob(".*.tmp"))          # no temp files left behind

    text = paths["metrics"].read_text()
    assert "NaN" not in text
    saved = json.loads(text)
    assert saved["per_class"]["Hernia"]["ap"] is None and saved["skipped"] == ["Hernia"]
    assert np.isclose(saved["mAP"], result["mAP"]) and saved["groups"]["tail"] == ["Pneumothorax", "Hernia"]

    rows = list(csv.DictReader(paths["per_class"].read_text().splitlines()))
    assert [r["class"] for r in rows] == NAMES
    assert list(rows[0]) == ["class", "group", "train_count", "support", "n", "ap", "auc", "f1", "threshold"]
    assert rows[5]["ap"] == "" and rows[0]["group"] == "head" and int(rows[0]["train_count"]) == 900

    md = paths["summary"].read_text()
    assert md.startswith("# fusion on test")
    assert summary_table(result) in md
    for row in ("| mAP |", "| mAUC |", "| mF1 |", "| mAP head |", "| mAP tail |", "| ECE |", "| n | 100 |"):
        assert row in md
    assert f"| mAP | {result['mAP']:.3f} |" in md
    assert "Hernia" in md.split("## Skipped classes")[1]

    for key in ("ap_per_class", "pr_curves", "reliability"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300


def test_write_report_without_scores_writes_no_plots(tmp_path):
    _, _, result = _example(0)
    paths = write_report(tmp_path, result)
    assert set(paths) == {"metrics", "per_class", "summary"}
    assert not list(tmp_path.glob("*.png"))


def test_compare_runs_puts_runs_side_by_side(two_runs):
    table = compare_runs(two_runs)
    header = table.splitlines()[0]
    assert "baseline" in header and "fusion" in header
    a, b = (json.loads((d / "metrics.json").read_text()) for d in two_runs)
    assert f"| mAP | {a['mAP']:.3f} | {b['mAP']:.3f} |" in table
    assert "| Hernia | tail | n/a | n/a |" in table
    assert table.index("| Effusion |") < table.index("| Hernia |")


def test_compare_runs_rejects_missing_metrics_and_other_class_lists(two_runs, tmp_path):
    empty = tmp_path / "not-evaluated"
    empty.mkdir()
    with pytest.raises(ChxError, match=r"not-evaluated.*chx evaluate .* --out"):
        compare_runs([two_runs[0], empty])
    other = json.loads((two_runs[1] / "metrics.json").read_text())
    other["per_class"]["Mass"] = other["per_class"].pop("Hernia")
    (two_runs[1] / "metrics.json").write_text(json.dumps(other))
    with pytest.raises(ChxError, match="other classes"):
        compare_runs(two_runs)
