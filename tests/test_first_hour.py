"""The first hour of a new user: documented forms work, one mAP per checkpoint, output that talks
when not on a terminal, a wrong images root found early."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl

from chx.models import load_checkpoint
from helpers import ROOT, TINY, run_chx, shared_path


def test_files_take_several_values_and_a_study_id(capsys, tmp_path, covid_backbone, covid_models):
    bundle = tmp_path / "m.chx"
    assert run_chx(capsys, "export", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                   "-o", bundle)[0] == 0
    a, b = sorted(shared_path("covid-cxr", "images").glob("*.png"))[:2]
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, "--files", a, b, "--study-id", "s1",
                           "-o", tmp_path / "p.csv")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "p.csv")["study_id"].to_list() == ["s1"]
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, a, "-o", tmp_path / "q.csv")
    assert code == 2 and "did you mean --files" in err


def test_compare_takes_several_report_folders(capsys, tmp_path, covid_models):
    for name in ("e1", "e2"):
        assert run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store", covid_models["store"],
                       "--split", "val", "-o", tmp_path / name)[0] == 0
    code, out, err = run_chx(capsys, "evaluate", "--compare", tmp_path / "e1", tmp_path / "e2")
    assert code == 0, err
    assert "| metric | e1 | e2 |" in out and "studies" in out


def test_training_and_evaluate_report_the_same_map_for_best_pt(capsys, tmp_path, covid_models):
    """train-fusion selects best.pt with the metric evaluate reports (flip TTA on a store with
    flipped maps), so the two numbers agree."""
    best = load_checkpoint(covid_models["fusion"])
    assert best["val_tta"] is True
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store",
                           covid_models["store"], "--split", "val", "-o", tmp_path / "e")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())["mAP"]
    assert abs(best["metrics"]["mAP"] - evaluated) < 1e-6


def test_progress_lines_when_not_on_a_terminal(tmp_path, nih_manifest):
    r = subprocess.run([sys.executable, "-m", "chx", "train-backbone", "--manifest", str(nih_manifest), "--images",
                        str(shared_path("nih-64px", "images")), *TINY, "--max-steps", "4", "--log-every", "1",
                        "--progress-every", "0.001", "-o", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train backbone: step")]
    assert len(lines) >= 3 and "loss" in lines[-1] and "items/s" in lines[-1] and "ETA" in lines[-1]
    assert "step 4/" in lines[-1]


def test_a_wrong_images_root_leaves_no_store(capsys, tmp_path, covid_backbone, covid_manifest):
    store = tmp_path / "f.zarr"
    wrong = tmp_path / "empty"
    wrong.mkdir()
    args = ["extract-features", "--checkpoint", covid_backbone, "--manifest", covid_manifest, "--store", store,
            "--workers", "0"]
    code, _, err = run_chx(capsys, *args, "--images", wrong)
    assert code == 2 and "missing" in err
    assert not store.exists()
    code, _, err = run_chx(capsys, *args, "--images", shared_path("covid-cxr", "images"))
    assert code == 0, err
