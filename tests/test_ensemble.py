"""`chx ensemble` (issue 29): members' probabilities averaged (weighted), class lists checked by name,
the folder checked on load, a run's last validation checkpoints as an ensemble, and predict and
evaluate taking the ensemble bundle."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from chx.data.datasets import ImageDataset
from chx.data.manifest import read_manifest, write_manifest
from chx.data.transforms import Preprocess
from chx.engine.ensemble import EnsemblePredictor, StageOnePredictor
from chx.engine.inference import predict_images
from chx.engine.predictor import Predictor
from chx.errors import ChxError
from chx.models import load_checkpoint, load_model, save_checkpoint
from chx.pipeline.ensemble import make_ensemble
from chx.pipeline.predict import collect_inputs
from helpers import ROOT, one_line, run_chx, shared_path

STUDIES = 24      # the first val studies: enough to differ, quick on the CPU


@pytest.fixture(scope="module")
def models(tmp_path_factory, covid_backbone, covid_models, covid_manifest):
    """Two exported bundles (one backbone, two fusion models of other seeds), the stage-1 checkpoint,
    the second fusion run (which kept its last 2 validation checkpoints), val studies."""
    from chx.options import FusionOptions, TrainConfig
    from chx.pipeline.export import export_bundle
    from chx.pipeline.train_fusion import train_fusion

    tmp = tmp_path_factory.mktemp("ensemble")
    run = tmp / "fusion-2"
    train_fusion(covid_models["store"], run, FusionOptions(dim=32, heads=4, ffn_dim=64),
                 TrainConfig(epochs=1, workers=0, device="cpu", seed=1, val_every=0.3, keep_checkpoints=2))
    export_bundle(covid_backbone, covid_models["fusion"], tmp / "a.chx")
    export_bundle(covid_backbone, run / "best.pt", tmp / "b.chx")
    images = shared_path("covid-cxr", "images")
    val = read_manifest(covid_manifest).filter(pl.col("split") == "val")
    keep = val["study_id"].unique(maintain_order=True).head(STUDIES)
    val = val.filter(pl.col("study_id").is_in(keep.implode()))
    write_manifest(val, tmp / "val.parquet")
    inputs = collect_inputs(manifest=tmp / "val.parquet", images=images)
    studies = [([Path(f) for f in g["file"]], g["view"].to_list(), g["image_id"].to_list())
               for _, g in inputs.group_by("study_id", maintain_order=True)]
    return {"tmp": tmp, "a": tmp / "a.chx", "b": tmp / "b.chx", "stage1": covid_backbone, "run": run,
            "studies": studies, "val": tmp / "val.parquet", "images": images, "val_df": val}


def probs(predictor, studies) -> np.ndarray:
    return predictor.predict_studies(studies, workers=0, show_progress=False)


def test_one_member_is_that_member_exactly(models, tmp_path):
    make_ensemble([models["a"]], tmp_path / "ens")
    got = probs(EnsemblePredictor.load(tmp_path / "ens", device="cpu"), models["studies"])
    want = probs(Predictor.load(models["a"], device="cpu"), models["studies"])
    assert got.shape == (STUDIES, want.shape[1]) and got.dtype == np.float32
    assert np.array_equal(got, want)


def test_two_members_mean_and_weighted_mean(models, tmp_path):
    pa = probs(Predictor.load(models["a"], device="cpu"), models["studies"])
    pb = probs(Predictor.load(models["b"], device="cpu"), models["studies"])
    assert np.abs(pa - pb).max() > 1e-3        # two different models, or the test proves nothing
    make_ensemble([models["a"], models["b"]], tmp_path / "mean")
    ens = EnsemblePredictor.load(tmp_path / "mean", device="cpu")
    np.testing.assert_allclose(probs(ens, models["studies"]), (pa + pb) / 2, rtol=0, atol=1e-6)
    make_ensemble([models["a"], models["b"]], tmp_path / "weighted", weights="3,1")
    ens = EnsemblePredictor.load(tmp_path / "weighted", device="cpu")
    assert list(ens.weights) == [0.75, 0.25]
    np.testing.assert_allclose(probs(ens, models["studies"]), 0.75 * pa + 0.25 * pb, rtol=0, atol=1e-6)
    doc = json.loads((tmp_path / "weighted" / "ensemble.json").read_text())
    assert [m["kind"] for m in doc["members"]] == ["bundle", "bundle"]
    assert all((tmp_path / "weighted" / m["path"]).is_file() for m in doc["members"])   # copied: self-contained


def test_a_stage_1_member_is_its_image_probabilities_averaged_per_study(models, tmp_path):
    make_ensemble([models["a"], models["stage1"]], tmp_path / "ens")
    ens = EnsemblePredictor.load(tmp_path / "ens", device="cpu")
    per, combined = ens.member_studies(models["studies"], workers=0, show_progress=False)
    # independently: the manifest's images through the stage-1 model (hflip TTA as trained), mean per study
    ckpt = load_checkpoint(models["stage1"])
    df = models["val_df"]
    ds = ImageDataset(df, models["images"], Preprocess.from_dict(ckpt["preprocess"]), classes=ckpt["class_names"])
    images = predict_images(load_model(ckpt), ds, workers=0, tta=bool(ckpt.get("tta", True)), show_progress=False)
    by_study = {}
    for sid, p in zip(df["study_id"].to_list(), images):
        by_study.setdefault(sid, []).append(p)
    want = np.stack([np.mean(v, axis=0) for v in by_study.values()])
    np.testing.assert_allclose(per[1], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(combined, (per[0] + per[1]) / 2, rtol=0, atol=1e-6)


def test_a_member_of_other_classes_is_refused_by_name(models, tmp_path):
    ckpt = load_checkpoint(models["stage1"])
    classes = list(ckpt["class_names"])
    renamed = tmp_path / "renamed.pt"
    save_checkpoint({**ckpt, "class_names": [*classes[:-1], "Made-up finding"]}, renamed)
    with pytest.raises(ChxError) as e:
        make_ensemble([models["a"], renamed], tmp_path / "ens")
    assert "renamed.pt" in str(e.value) and "'Made-up finding'" in str(e.value) and repr(classes[-1]) in str(e.value)
    assert not (tmp_path / "ens").exists()


@pytest.mark.parametrize("weights,expected", [("1", "1 weight(s) for 2 member(s)"), ("1,-2", "positive"),
                                              ("1,x", "numbers separated by commas")])
def test_bad_weights_are_one_line(models, tmp_path, weights, expected):
    with pytest.raises(ChxError, match=re.escape(expected)):
        make_ensemble([models["a"], models["b"]], tmp_path / "ens", weights=weights)


def test_an_edited_or_replaced_member_is_refused_on_load(models, tmp_path):
    make_ensemble([models["a"], models["b"]], tmp_path / "ens")
    doc_path = tmp_path / "ens" / "ensemble.json"
    doc = json.loads(doc_path.read_text())
    member = tmp_path / "ens" / doc["members"][1]["path"]
    shutil.copyfile(models["a"], member)
    with pytest.raises(ChxError, match="sha256 differs"):
        EnsemblePredictor.load(tmp_path / "ens", device="cpu")
    shutil.copyfile(models["b"], member)
    EnsemblePredictor.load(tmp_path / "ens", device="cpu")
    doc["members"][0]["weight"], doc["members"][1]["weight"] = 0.9, 0.1
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ChxError, match="was edited"):
        EnsemblePredictor.load(tmp_path / "ens", device="cpu")


def test_a_runs_last_validation_checkpoints(models, tmp_path, covid_backbone):
    kept = sorted(p.name for p in models["run"].glob("ckpt-step*.pt"))
    assert len(kept) == 2, kept                     # --keep-checkpoints 2 of more validations
    metrics = [json.loads(x) for x in (models["run"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in metrics if r["kind"] == "val"]
    assert len(steps) > 2 and kept == sorted(f"ckpt-step{s}.pt" for s in steps[-2:])
    with pytest.raises(ChxError, match="--backbone"):
        make_ensemble([], tmp_path / "x", from_run=models["run"], last=2)
    with pytest.raises(ChxError, match="kept only 2"):
        make_ensemble([], tmp_path / "x", from_run=models["run"], last=3, backbone=covid_backbone)
    make_ensemble([], tmp_path / "ens", from_run=models["run"], last=2, backbone=covid_backbone)
    ens = EnsemblePredictor.load(tmp_path / "ens", device="cpu")
    members = [Predictor.load(tmp_path / "ens" / m, device="cpu")
               for m in sorted(p.relative_to(tmp_path / "ens") for p in (tmp_path / "ens" / "members").iterdir())]
    want = np.mean([probs(m, models["studies"]) for m in members], axis=0)
    np.testing.assert_allclose(probs(ens, models["studies"]), want, rtol=0, atol=1e-6)


def test_predict_takes_the_ensemble_bundle(models, tmp_path, capsys):
    code, out, err = run_chx(capsys, "ensemble", models["a"], models["stage1"], "--weights", "1,1", "-o",
                             tmp_path / "ens")
    assert code == 0, err
    assert "2 members" in out
    code, _, err = run_chx(capsys, "ensemble", models["a"], "-o", tmp_path / "ens")
    one_line(code, err, "already holds", "--overwrite")
    args = ["predict", "--bundle", tmp_path / "ens", "--manifest", models["val"], "--images", models["images"],
            "--workers", "0"]
    code, out, err = run_chx(capsys, *args, "-o", tmp_path / "p.csv")
    assert code == 0, err
    table = pl.read_csv(tmp_path / "p.csv")
    want = probs(EnsemblePredictor.load(tmp_path / "ens", device="cpu"), models["studies"])
    np.testing.assert_allclose(table.drop("study_id").to_numpy(), want, rtol=1e-6, atol=1e-6)
    code, _, err = run_chx(capsys, *args, "--explain", tmp_path / "ex", "-o", tmp_path / "q.csv")
    one_line(code, err, "ensemble bundle", "one by one")
    code, _, err = run_chx(capsys, "explain", "--bundle", tmp_path / "ens", "--manifest", models["val"],
                           "--images", models["images"], "-o", tmp_path / "ex")
    one_line(code, err, "ensemble bundle", "members/")


def test_cli_ensemble_in_its_own_process(models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def chx(*args):
        p = subprocess.run([sys.executable, "-m", "chx", *map(str, args)], cwd=ROOT, env=env, text=True,
                           capture_output=True, timeout=300)
        return p.returncode, p.stdout, p.stderr

    code, out, err = chx("ensemble", models["a"], models["b"], "--weights", "2,1", "-o", tmp_path / "ens")
    assert code == 0, err
    assert "2 members (weights 0.667, 0.333)" in out
    assert json.loads((tmp_path / "ens" / "ensemble.json").read_text())["format"] == "chx-ensemble-1"
    code, _, err = chx("ensemble", models["a"], models["run"] / "best.pt", "-o", tmp_path / "bad")
    one_line(code, err, "fusion checkpoint", "chx export --backbone")
    assert not (tmp_path / "bad").exists()


def test_compare_an_ensemble_with_its_members(models, tmp_path, capsys):
    """`chx compare --ensemble`: each member's row, the ensemble's row, and the paired difference
    (ensemble minus member, on the same resampled studies); a one-member ensemble differs by 0 exactly."""
    code, _, err = run_chx(capsys, "ensemble", models["a"], models["b"], models["stage1"], "-o", tmp_path / "ens")
    assert code == 0, err
    args = ["compare", "--ensemble", tmp_path / "ens", "--manifest", models["val"], "--images", models["images"],
            "--workers", "0", "--bootstrap", "200"]
    code, out, err = run_chx(capsys, *args, "-o", tmp_path / "cmp.md")
    assert code == 0, err
    assert "| member | studies |" in out and "ensemble − member [95 % CI]" in out
    results = json.loads((tmp_path / "cmp.json").read_text())
    names = list(results)
    assert len(names) == 4 and names[-1] == "ensemble" and all(r["n_studies"] == STUDIES for r in results.values())
    for name in names[:-1]:
        d = results[name]["ensemble_minus"]
        assert d["mAP_diff"] == pytest.approx(results["ensemble"]["mAP"] - results[name]["mAP"], abs=1e-9)
        lo, hi = d["mAP_diff_ci"]
        assert lo <= d["mAP_diff"] <= hi and results[name]["mAP_ci"] is not None
    # evaluate's report of the ensemble: the same rows, intervals and paired intervals
    code, out, err = run_chx(capsys, "evaluate", "--checkpoint", tmp_path / "ens", "--manifest", models["val"],
                             "--images", models["images"], "--split", "val", "--workers", "0", "--bootstrap", "200",
                             "-o", tmp_path / "eval")
    assert code == 0, err
    assert "ensemble − model [95 % CI]" in out
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["members"]
    assert [r["model"] for r in rows] == names
    for r in rows:
        assert r["mAP"] == pytest.approx(results[r["model"]]["mAP"], abs=1e-12)
        assert r["mAP_ci"] == pytest.approx(results[r["model"]]["mAP_ci"], abs=1e-12)
        if r["model"] != "ensemble":
            want = results[r["model"]]["ensemble_minus"]
            assert r["ensemble_minus"]["mAP_diff"] == pytest.approx(want["mAP_diff"], abs=1e-12)
            assert r["ensemble_minus"]["mAP_diff_ci"] == pytest.approx(want["mAP_diff_ci"], abs=1e-12)
    code, _, err = run_chx(capsys, "ensemble", models["a"], "-o", tmp_path / "one")
    assert code == 0, err
    code, _, err = run_chx(capsys, *[tmp_path / "one" if a == tmp_path / "ens" else a for a in args],
                           "-o", tmp_path / "one.md")
    assert code == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    member = next(k for k in one if k != "ensemble")
    assert one[member]["ensemble_minus"]["mAP_diff"] == 0 and one[member]["ensemble_minus"]["mAP_diff_ci"] == [0, 0]
    # mistakes: one line each
    code, _, err = run_chx(capsys, *args, "--store", "x.zarr")
    one_line(code, err, "--ensemble", "drop --store")
    code, _, err = run_chx(capsys, "compare", "--backbone", models["stage1"], "--manifest", models["val"],
                           "--images", models["images"])
    one_line(code, err, "missing: --fusion, --store", "--ensemble")
