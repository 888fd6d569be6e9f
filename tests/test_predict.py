"""export + predict end to end on real images: same preprocessing as training, deterministic,
CXR-LT submission joined by key."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl

from chx.data.manifest import read_manifest, write_manifest
from chx.data.study_dataset import StudyDataset
from chx.models.fusion import FusionModel
from chx.models import load_checkpoint, save_checkpoint
from chx.engine.inference import predict_studies
from helpers import run_chx, shared_path


def test_predict_equals_the_store_path_and_writes_a_submission(capsys, tmp_path, covid_models, covid_backbone,
                                                                covid_manifest):
    bundle = tmp_path / "model.chx"
    code, out, err = run_chx(capsys, "export", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                             "-o", bundle)
    assert code == 0, err
    val = read_manifest(covid_manifest).filter(pl.col("split") == "val")
    write_manifest(val, tmp_path / "val.parquet")
    args = ["predict", "--bundle", bundle, "--manifest", tmp_path / "val.parquet", "--images",
            shared_path("covid-cxr", "images")]
    code, out, err = run_chx(capsys, *args, "-o", tmp_path / "p.csv")
    assert code == 0, err
    pred = pl.read_csv(tmp_path / "p.csv")
    assert pred.height == val["study_id"].n_unique()

    # The same studies through the store and the fusion model (what training and evaluation see).
    ckpt = load_checkpoint(covid_models["fusion"])
    fusion = FusionModel.from_config(ckpt["model_config"])
    fusion.load_state_dict(ckpt["state_dict"])
    ds = StudyDataset(covid_models["store"], "val")
    want = predict_studies(fusion, ds)
    want_flip = predict_studies(fusion, StudyDataset(covid_models["store"], "val", use_flip=True))
    want = dict(zip(ds.study_ids, 0.5 * (want + want_flip)))       # the store has flipped maps: TTA
    classes = ckpt["class_names"]
    got = {r[0]: np.array(r[1:]) for r in pred.select(["study_id", *classes]).iter_rows()}
    for sid, p in got.items():
        np.testing.assert_allclose(p, want[sid], rtol=1e-3, atol=1e-3)

    code, _, err = run_chx(capsys, *args, "--format", "cxr-lt", "-o", tmp_path / "sub.csv")
    assert code == 0, err
    sub = pl.read_csv(tmp_path / "sub.csv")
    assert sub.columns == ["dicom_id", *classes] and sub.height == val.height
    joined = sub.join(val.select(pl.col("image_id").alias("dicom_id"), "study_id"), on="dicom_id")
    for row in joined.iter_rows(named=True):
        np.testing.assert_allclose([row[c] for c in classes], got[row["study_id"]], rtol=1e-6)

    # Deterministic: a second run gives the same file.
    assert run_chx(capsys, *args, "-o", tmp_path / "p2.csv")[0] == 0
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "p2.csv").read_bytes()


def test_predict_on_study_folders_and_files(capsys, tmp_path, covid_models, covid_backbone):
    src = shared_path("covid-cxr", "images")
    studies = tmp_path / "studies"
    for name, files in {"a": ["000001-12.png", "000001-17.png"], "b": ["000002-14.png"]}.items():
        (studies / name).mkdir(parents=True)
        for f in files:
            shutil.copy(src / f, studies / name / f)
    common = ["--backbone", covid_backbone, "--fusion", covid_models["fusion"]]
    code, out, err = run_chx(capsys, "predict", *common, "--studies", studies, "--format", "json",
                             "-o", tmp_path / "p.json")
    assert code == 0, err
    assert "2 rows (2 studies, 3 images)" in out
    code, out, err = run_chx(capsys, "predict", *common, "--files", src / "000002-14.png", "-o", tmp_path / "one.csv")
    assert code == 0, err
    (studies / "empty").mkdir()
    code, _, err = run_chx(capsys, "predict", *common, "--studies", studies, "-o", tmp_path / "x.csv")
    assert code == 2 and "empty" in err and "holds no image" in err
    (studies / "empty" / "bad.png").write_text("not an image")
    code, _, err = run_chx(capsys, "predict", *common, "--studies", studies, "-o", tmp_path / "x.csv")
    assert code == 2 and "bad.png" in err
    assert not (tmp_path / "x.csv").exists()


def test_export_refuses_a_fusion_model_of_another_backbone(capsys, tmp_path, covid_models, covid_backbone):
    ckpt = load_checkpoint(covid_models["fusion"])
    ckpt["store_fingerprint"] = {**ckpt["store_fingerprint"], "checkpoint_sha256": "0" * 64}
    ckpt.pop("format")
    save_checkpoint(ckpt, tmp_path / "other.pt")
    code, _, err = run_chx(capsys, "export", "--backbone", covid_backbone, "--fusion", tmp_path / "other.pt",
                           "-o", tmp_path / "m.chx")
    assert code == 2 and "another backbone" in err
    assert not (tmp_path / "m.chx").exists()
