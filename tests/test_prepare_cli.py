"""`chx prepare` as a new user meets it: clear one-line errors, no partial files, patient splits."""

from __future__ import annotations

import polars as pl

from chx.data.manifest import read_manifest
from tests.conftest import run_chx, shared_path


def test_unknown_dataset_missing_file_and_bad_columns_are_one_line(capsys, tmp_path):
    out = tmp_path / "m.parquet"
    code, _, err = run_chx(capsys, "prepare", "mimic", tmp_path, "-o", out)
    assert code == 2 and "mimic" in err and "nih" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_chx(capsys, "prepare", "nih", tmp_path / "nope.csv", "-o", out)
    assert code == 2 and "nope.csv" in err and "Traceback" not in err
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Labels\nx.png,Edema\n")
    code, _, err = run_chx(capsys, "prepare", "nih", bad, "-o", out)
    assert code == 2 and "bad.csv" in err and "Finding Labels" in err
    code, _, err = run_chx(capsys, "prepare", "nih", bad, "--uncertain", "ones", "-o", out)
    assert code == 2 and "--uncertain applies only to `chx prepare chexpert`" in err
    code, _, err = run_chx(capsys, "prepare", "nih", bad, "--val-fraction", "1.5", "-o", out)
    assert code == 2
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_nih_split_by_patient_has_no_leakage(capsys, tmp_path):
    out = tmp_path / "nih.parquet"
    code, stdout, err = run_chx(capsys, "prepare", "nih", shared_path("metadata", "nih_data_entry_2017_v2020.csv.gz"),
                                "--val-fraction", "0.1", "--test-fraction", "0.1", "--seed", "1", "-o", out)
    assert code == 0, err
    assert "112,120 images" in stdout and "30,805 patients" in stdout
    df = read_manifest(out)
    splits_per_patient = df.group_by("subject_id").agg(pl.col("split").n_unique())["split"]
    assert splits_per_patient.max() == 1
    hernia = df.filter(pl.col("Hernia") == 1).group_by("split").len()
    assert set(hernia["split"]) == {"train", "val", "test"}  # the rarest NIH class is in every split
    patients = df.group_by("split").agg(pl.col("subject_id").n_unique()).sort("split")
    share = dict(patients.iter_rows())
    assert abs(share["val"] / 30_805 - 0.1) < 0.01 and abs(share["test"] / 30_805 - 0.1) < 0.01
