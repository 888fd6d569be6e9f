"""Trust nothing on disk, classes 3-6 of the adversarial review: run folders owned by one run,
outputs never silently replaced, paths that stay under the root, one line for every failure, and
weak inputs refused or said out loud. (Stores: tests/test_store.py and tests/test_store_trust.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import zipfile

import numpy as np
import polars as pl
import pytest

from chx.data.manifest import read_manifest, write_manifest
from chx.errors import ChxError
from chx.models import load_checkpoint, save_checkpoint
from helpers import TINY, one_line, run_chx, shared_path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, covid_backbone, covid_models):
    out = tmp_path_factory.mktemp("bundle") / "model.chx"
    from chx.pipeline.export import export_bundle

    export_bundle(covid_backbone, covid_models["fusion"], out)
    return out


@pytest.fixture(scope="module")
def val_manifest(tmp_path_factory, covid_manifest):
    out = tmp_path_factory.mktemp("val") / "val.parquet"
    write_manifest(read_manifest(covid_manifest).filter(pl.col("split") == "val").head(6), out)
    return out


# ------------------------------------------------------------------ 3. run folders and outputs

def test_a_second_run_into_a_busy_run_folder_is_refused(capsys, tmp_path, nih_manifest):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:        # another process is training there
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images",
                               shared_path("nih-64px", "images"), *TINY, "--max-steps", "1", "-o", out)
    one_line(code, err, "another chx process is training in")
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()


def test_resume_with_changed_options_is_refused_naming_them(capsys, tmp_path, nih_manifest):
    args = ["train-backbone", "--manifest", nih_manifest, "--images", shared_path("nih-64px", "images"),
            *TINY, "--epochs", "1", "--max-steps", "2", "--val-every", "1", "-o", tmp_path / "r"]
    assert run_chx(capsys, *args)[0] == 0
    before = (tmp_path / "r" / "config.json").read_text()
    code, _, err = run_chx(capsys, *args, "--resume", "--lr", "1e-3", "--no-balance")
    one_line(code, err, "option(s) differ")
    assert "--lr 3e-05 -> 0.001" in err and "--balance True -> False" in err
    assert (tmp_path / "r" / "config.json").read_text() == before      # records what ran


def test_best_checkpoint_holds_weights_not_optimizer_state(covid_backbone):
    best = load_checkpoint(covid_backbone)
    last = load_checkpoint(covid_backbone.parent / "last.pt")
    assert "optimizer" not in best and "rng" not in best and "optimizer" in last
    assert best["state_dict"].keys() == last["state_dict"].keys()


def test_existing_outputs_are_not_replaced_without_overwrite(capsys, tmp_path, covid_backbone, covid_models,
                                                            bundle, val_manifest):
    table = shared_path("metadata", "nih_data_entry_2017_v2020.csv.gz")
    existing = tmp_path / "old.parquet"
    existing.write_bytes(b"users data")
    code, _, err = run_chx(capsys, "prepare", "nih", table, "-o", existing)
    one_line(code, err, "exists")
    code, _, err = run_chx(capsys, "export", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                           "-o", existing)
    one_line(code, err, "exists")
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, "--manifest", val_manifest, "--images",
                           shared_path("covid-cxr", "images"), "-o", existing)
    one_line(code, err, "exists")
    assert existing.read_bytes() == b"users data"

    report = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", covid_models["fusion"], "--store", covid_models["store"], "--split", "val",
            "-o", report]
    assert run_chx(capsys, *args)[0] == 0
    code, _, err = run_chx(capsys, *args)
    one_line(code, err, "already holds a report")
    assert run_chx(capsys, *args, "--overwrite")[0] == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    code, _, err = run_chx(capsys, *args[:-1], foreign, "--overwrite")
    one_line(code, err, "did not write")
    assert (foreign / "thesis.tex").read_text() == "do not delete"


def test_interrupted_evaluation_leaves_the_old_report_whole(capsys, tmp_path, covid_models, monkeypatch):
    report = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", covid_models["fusion"], "--store", covid_models["store"], "--split", "val",
            "-o", report, "--overwrite"]
    assert run_chx(capsys, *args)[0] == 0
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    assert {"metrics.json", "predictions.csv", "summary.md", "reliability.png"} <= set(before)

    import chx.plots

    def killed(*a, **k):
        raise KeyboardInterrupt   # SIGINT while the plots are drawn
    monkeypatch.setattr(chx.plots, "plot_reliability", killed)
    code, _, err = run_chx(capsys, *args)
    assert code == 130 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval")]   # no temp folder left


def test_predictions_csv_in_the_report_folder(capsys, tmp_path, covid_models):
    report = tmp_path / "eval"
    run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store", covid_models["store"],
            "--split", "val", "-o", report)
    pred = pl.read_csv(report / "predictions.csv")
    metrics = json.loads((report / "metrics.json").read_text())
    assert pred.columns[0] == "study_id" and pred.height == metrics["n"] and metrics["unit"] == "studies"


@pytest.mark.parametrize("recorded", ["patients", "sha256-only"])
def test_a_changed_manifest_is_noticed_at_extraction(capsys, tmp_path, covid_backbone, covid_manifest, recorded):
    """The split was redone (train and val swapped) and the manifest moved: a checkpoint with its
    training patients recorded warns of leakage by content; an older one (sha256 by file name only)
    warns that the manifest changed."""
    ckpt = load_checkpoint(covid_backbone)
    assert ckpt["manifest_sha256"][str(covid_manifest)] and len(ckpt["train_patients"]["hashes"])
    moved = tmp_path / "covid.parquet"
    df = read_manifest(covid_manifest)
    write_manifest(df.with_columns(pl.when(pl.col("split") == "train").then(pl.lit("val"))
                                   .otherwise(pl.lit("train")).alias("split")), moved)
    ckpt["manifest_sha256"] = {str(moved): ckpt["manifest_sha256"][str(covid_manifest)]}
    if recorded == "sha256-only":
        del ckpt["train_patients"]
    save_checkpoint(ckpt, tmp_path / "b.pt")
    code, out, err = run_chx(capsys, "extract-features", "--checkpoint", tmp_path / "b.pt", "--manifest", moved,
                             "--images", shared_path("covid-cxr", "images"), "--store", tmp_path / "s.zarr",
                             "--workers", "0")
    assert code == 0, err
    expected = "patient leakage" if recorded == "patients" else f"warning: {moved} changed since"
    assert expected in out, out


# ------------------------------------------------------------------ 4. paths outside the root

@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "a/../../outside.png"])
def test_predict_refuses_manifest_paths_outside_the_root(capsys, tmp_path, bundle, val_manifest, path):
    df = read_manifest(val_manifest)
    write_manifest(df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(path))
                                   .otherwise(pl.col("path")).alias("path")), tmp_path / "m.parquet")
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, "--manifest", tmp_path / "m.parquet", "--images",
                           shared_path("covid-cxr", "images"), "-o", tmp_path / "p.csv")
    one_line(code, err, "leaves the images root")
    assert not (tmp_path / "p.csv").exists()


def test_symlinks_under_the_root_are_followed(capsys, tmp_path, bundle, val_manifest):
    """Documented: the check is on the manifest's paths; a link under the root is followed (image
    collections are often folders of links to storage)."""
    root = tmp_path / "root"
    root.mkdir()
    df = read_manifest(val_manifest)
    for p in df["path"]:
        os.symlink(shared_path("covid-cxr", "images", p), root / p)
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, "--manifest", val_manifest, "--images", root,
                           "-o", tmp_path / "p.csv")
    assert code == 0, err


# ------------------------------------------------------------------ 5. one line, never a traceback

def test_unwritable_outputs_are_one_line(capsys, tmp_path, covid_models, bundle, val_manifest, nih_manifest):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", nih_manifest, "--images",
                           shared_path("nih-64px", "images"), *TINY, "--max-steps", "1", "-o", blocker / "run")
    one_line(code, err, "cannot write the run folder")
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store",
                           covid_models["store"], "--split", "val", "-o", blocker / "eval")
    one_line(code, err, "could not write the report folder")
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, "--manifest", val_manifest, "--images",
                           shared_path("covid-cxr", "images"), "-o", blocker / "p.csv")
    one_line(code, err, "could not write")


@pytest.mark.parametrize("n_names", [13, 15])
def test_a_bundle_whose_class_list_does_not_fit_its_weights(capsys, tmp_path, bundle, val_manifest, n_names):
    data = load_checkpoint(bundle, kind="bundle")
    data["class_names"] = [f"c{i}" for i in range(n_names)]
    save_checkpoint(data, tmp_path / "edited.chx")
    code, _, err = run_chx(capsys, "predict", "--bundle", tmp_path / "edited.chx", "--manifest", val_manifest,
                           "--images", shared_path("covid-cxr", "images"), "-o", tmp_path / "p.csv")
    one_line(code, err, "the bundle is damaged or was edited")


def test_a_checkpoint_whose_config_names_another_model(capsys, tmp_path, covid_backbone, covid_manifest):
    ckpt = load_checkpoint(covid_backbone)
    ckpt["model_config"] = {**ckpt["model_config"], "backbone_name": "convnext_atto"}
    save_checkpoint(ckpt, tmp_path / "b.pt")
    code, _, err = run_chx(capsys, "pseudo-label", "--checkpoint", tmp_path / "b.pt", "--manifest", covid_manifest,
                           "--images", shared_path("covid-cxr", "images"), "-o", tmp_path / "p.parquet")
    one_line(code, err, "do not fit its model configuration")


def test_compare_on_an_edited_metrics_file(capsys, tmp_path, covid_models):
    report = tmp_path / "eval"
    run_chx(capsys, "evaluate", "--checkpoint", covid_models["fusion"], "--store", covid_models["store"],
            "--split", "val", "-o", report)
    metrics = json.loads((report / "metrics.json").read_text())
    first = next(iter(metrics["per_class"]))
    metrics["per_class"][first]["ap"] = "high"
    (report / "metrics.json").write_text(json.dumps(metrics))
    code, _, err = run_chx(capsys, "evaluate", "--compare", report, report)
    one_line(code, err, "edited or damaged")


def test_a_zip_bomb_checkpoint_is_refused_before_loading(tmp_path):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 * 2**20))   # 64 MiB of zeros in a tiny file
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ChxError, match="unpacks to"):
        load_checkpoint(bomb)


# ------------------------------------------------------------------ 6. weak inputs

@pytest.mark.parametrize("word", ["NaN", "nan", "None", "null"])
def test_a_missing_study_id_written_as_a_word_is_refused(tmp_path, covid_manifest, word):
    df = read_manifest(covid_manifest)
    df.with_columns(pl.lit(word).alias("study_id")).write_csv(tmp_path / "m.csv")
    with pytest.raises(ChxError, match="column study_id: empty value"):
        read_manifest(tmp_path / "m.csv")


def test_soft_labels_only_where_pseudo_labels_are_meant(capsys, tmp_path, covid_manifest, covid_backbone):
    df = read_manifest(covid_manifest)
    first = df.columns[6]
    soft = df.with_columns(pl.when(pl.col(first) == 0).then(0.7).otherwise(pl.col(first)).alias(first))
    write_manifest(soft, tmp_path / "soft.parquet")
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", covid_backbone, "--manifest", tmp_path / "soft.parquet",
                           "--images", shared_path("covid-cxr", "images"), "--split", "val", "-o", tmp_path / "e")
    one_line(code, err, "soft labels in (0, 1) are pseudo labels")
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", tmp_path / "soft.parquet", "--images",
                           shared_path("covid-cxr", "images"), *TINY, "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 0, err
    assert "soft labels (between 0 and 1): trained as pseudo labels" in err


def test_a_semicolon_csv_gets_a_separator_hint(tmp_path, covid_manifest):
    read_manifest(covid_manifest).write_csv(tmp_path / "m.csv", separator=";")
    with pytest.raises(ChxError, match="looks ';'-separated"):
        read_manifest(tmp_path / "m.csv")


def _dicom_like(src, dst, **tags):
    import pydicom

    ds = pydicom.dcmread(src)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(dst)


def test_a_ct_dicom_is_refused_and_extensionless_dicoms_are_found(capsys, tmp_path, bundle):
    src = next(shared_path("dicom").glob("*.dcm"))
    study = tmp_path / "studies" / "s1"
    study.mkdir(parents=True)
    shutil.copy(src, study / "IM0001")                                # no suffix: still a DICOM
    code, out, err = run_chx(capsys, "predict", "--bundle", bundle, "--studies", tmp_path / "studies",
                             "-o", tmp_path / "p.csv")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "p.csv")["study_id"].to_list() == ["s1"]
    _dicom_like(src, tmp_path / "ct.dcm", Modality="CT")
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, "--files", tmp_path / "ct.dcm",
                           "-o", tmp_path / "q.csv")
    one_line(code, err, "is a CT image")


def test_the_output_suffix_decides_the_format(capsys, tmp_path, bundle, val_manifest):
    args = ["predict", "--bundle", bundle, "--manifest", val_manifest, "--images", shared_path("covid-cxr", "images")]
    assert run_chx(capsys, *args, "-o", tmp_path / "p.json")[0] == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert isinstance(rows, list) and "study_id" in rows[0]
    code, _, err = run_chx(capsys, *args, "--format", "csv", "-o", tmp_path / "q.json")
    one_line(code, err, "ends in .json but --format csv")
    assert not (tmp_path / "q.json").exists()
    assert np.isfinite(pl.read_json(tmp_path / "p.json").drop("study_id").to_numpy()).all()
