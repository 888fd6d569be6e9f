"""chx evaluate on real images with tiny models: report files, values, errors, --views, --compare."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from sklearn.metrics import average_precision_score

from chx.data.study_dataset import StudyDataset
from chx.models.fusion import FusionModel
from chx.models import load_checkpoint
from chx.engine.inference import predict_studies
from helpers import run_chx, shared_path


def test_evaluate_fusion_writes_report_and_agrees_with_sklearn(capsys, tmp_path, covid_models):
    out = tmp_path / "eval"
    code, stdout, err = run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store",
                                covid_models["store"], "--split", "val", "-o", out)
    assert code == 0, err
    assert "mAP" in stdout and "report:" in stdout
    for name in ("metrics.json", "per_class.csv", "summary.md"):
        assert (out / name).exists(), name
    assert len(list(out.glob("*.png"))) == 3
    m = json.loads((out / "metrics.json").read_text())
    # Recompute one class's AP independently: predictions (with the store's flip TTA) + sklearn.
    ckpt = load_checkpoint(covid_models["fusion"])
    model = FusionModel.from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    ds = StudyDataset(covid_models["store"], "val")
    scores = 0.5 * (predict_studies(model, ds) +
                    predict_studies(model, StudyDataset(covid_models["store"], "val", use_flip=True)))
    c = ckpt["class_names"].index("COVID-19")
    keep = ~np.isnan(ds.labels[:, c])
    assert np.isclose(m["per_class"]["COVID-19"]["ap"], average_precision_score(ds.labels[keep, c], scores[keep, c]))
    assert m["meta"]["split"] == "val" and m["skipped"]


def test_evaluate_backbone_views_compare_and_errors(capsys, tmp_path, covid_models, covid_backbone, covid_manifest):
    images = shared_path("covid-cxr", "images")
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_backbone, "--manifest", covid_manifest,
                           "--images", images, "--split", "val", "-o", tmp_path / "b")
    assert code == 0, err
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store",
                           covid_models["store"], "--split", "val", "--views", "frontal", "-o", tmp_path / "f")
    assert code == 0, err
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["meta"]["views"] == "frontal"
    code, out, err = run_chx(capsys, "evaluate", "--compare", tmp_path / "b", "--compare", tmp_path / "f")
    assert code == 0, err
    assert out.startswith("| metric | b | f |") and "| mAP |" in out

    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store",
                           covid_models["store"], "--split", "test", "-o", tmp_path / "x")
    assert code == 2 and "split 'test' is not in the data" in err
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_backbone, "--manifest",
                           tmp_path / "nope.parquet", "--images", images, "-o", tmp_path / "x")
    assert code == 2 and "nope.parquet" in err
    df = pl.read_parquet(covid_manifest).drop("ARDS")
    df.write_parquet(tmp_path / "fewer.parquet")
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_backbone, "--manifest", tmp_path / "fewer.parquet",
                           "--images", images, "--split", "val", "-o", tmp_path / "x")
    assert code == 2 and "other classes" in err
    assert not (tmp_path / "x").exists()
