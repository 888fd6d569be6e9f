"""Stage 1 end to end on real images with a tiny timm model: CLI, run folder, pseudo-labels."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from chx.data.manifest import class_columns, read_manifest, write_manifest
from chx.models import load_checkpoint
from helpers import TINY, run_chx, shared_path


def test_train_backbone_on_real_nih_images(capsys, tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")
    out = tmp_path / "run"
    code, stdout, err = run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images", images,
                                *TINY, "--epochs", "1", "--max-steps", "6", "--val-every", "0.5",
                                "--batch-size", "16", "-o", out)
    assert code == 0, err
    assert "trained 6 steps" in stdout
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "last.pt", "best.pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 3e-5 and config["class_names"] == class_columns(read_manifest(nih_manifest))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    assert vals and all(0 <= r["mAP"] <= 1 for r in vals)
    ckpt = load_checkpoint(out / "best.pt", kind="backbone")
    assert ckpt["preprocess"]["size"] == 64
    # Classes NIH does not annotate (e.g. Fracture) are skipped in the validation mAP, not scored as 0.
    assert "Fracture" in vals[0]["skipped"]


def test_pseudo_label_fills_only_nulls_and_union_trains(capsys, tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")
    run = tmp_path / "b"
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images", images, *TINY,
                           "--max-steps", "2", "--batch-size", "8", "-o", run)
    assert code == 0, err
    # External data: the NIH validation patients, as an unsplit manifest.
    df = read_manifest(nih_manifest)
    external = df.filter(pl.col("split") == "val").with_columns(pl.lit(None, pl.Utf8).alias("split"))
    write_manifest(external, tmp_path / "ext.parquet")
    code, stdout, err = run_chx(capsys, "pseudo-label", "--checkpoint", run / "best.pt",
                                "--manifest", tmp_path / "ext.parquet", "--images", images,
                                "--workers", "0", "-o", tmp_path / "pseudo.parquet")
    assert code == 0, err
    before = external.select(class_columns(external)).to_numpy()
    after = read_manifest(tmp_path / "pseudo.parquet", soft=True).select(class_columns(external)).to_numpy()
    nulls = np.isnan(before)
    assert nulls.any() and not np.isnan(after).any()
    assert np.array_equal(after[~nulls], before[~nulls])          # own 0/1 labels kept
    assert ((after[nulls] > 0) & (after[nulls] < 1)).all()        # soft labels where there were none
    assert "null labels filled" in stdout

    # Second round: train on the union of the labelled train split and the pseudo-labelled set.
    train_only = df.filter(pl.col("split") == "train")
    write_manifest(train_only, tmp_path / "own.parquet")
    code, stdout, err = run_chx(capsys, "train-backbone", "--manifest", tmp_path / "own.parquet",
                                "--manifest", tmp_path / "pseudo.parquet", "--images", images, *TINY,
                                "--max-steps", "2", "--batch-size", "8", "-o", tmp_path / "b2")
    assert code == 0, err
    cfg = json.loads((tmp_path / "b2" / "config.json").read_text())
    assert len(cfg["options"]["manifests"]) == 2


def test_train_backbone_user_errors_are_one_line(capsys, tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")
    df = read_manifest(nih_manifest)
    write_manifest(df.with_columns(pl.lit("val").alias("split")), tmp_path / "noval.parquet")
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", tmp_path / "noval.parquet",
                           "--images", images, *TINY, "-o", tmp_path / "r")
    assert code == 2 and "no training rows" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images",
                           tmp_path, *TINY, "-o", tmp_path / "r")
    assert code == 2 and "missing" in err and "--images" in err
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images", images,
                           *TINY, "--lr", "-1", "-o", tmp_path / "r")
    assert code == 2 and "--lr" in err
    assert not (tmp_path / "r" / "last.pt").exists()


def test_resume_with_another_class_list_is_refused(capsys, tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")
    out = tmp_path / "r"
    assert run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images", images, *TINY,
                   "--max-steps", "1", "-o", out)[0] == 0
    df = read_manifest(nih_manifest)
    write_manifest(df.drop("Hernia"), tmp_path / "fewer.parquet")
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", tmp_path / "fewer.parquet", "--images",
                           images, *TINY, "--resume", "-o", out)
    assert code == 2 and "other classes" in err


def test_class_without_training_positives_warns_and_still_trains(capsys, tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images", images, *TINY,
                           "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 0, err
    # NIH does not annotate e.g. Fracture: no positive training image, named in the warning.
    assert "have no positive training image" in err and "Fracture" in err
