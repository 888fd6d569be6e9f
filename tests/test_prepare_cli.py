"""`chx prepare` as a new user meets it: clear one-line errors, no partial files, patient splits."""

from __future__ import annotations

import polars as pl

from chx.data.manifest import read_manifest
from helpers import run_chx, shared_path


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


def write_nih(path, rows=(("a.png", "Effusion", "1", "PA"), ("b.png", "No Finding", "2", "AP"),
                          ("c.png", "Cardiomegaly|Effusion", "2", "PA"))):
    path.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,View Position\n"
                    + "".join(f"{i},{f},0,{p},{v}\n" for i, f, p, v in rows))
    return path


def test_class_typo_is_refused_with_did_you_mean(capsys, tmp_path):
    table, out = write_nih(tmp_path / "Data_Entry_2017.csv"), tmp_path / "m.parquet"
    code, _, err = run_chx(capsys, "prepare", "nih", table, "--classes", "Pleural Efusion,Cardiomegaly", "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'Pleural Efusion' is neither a class nih annotates nor a known class name; did you mean " \
           "'Pleural Effusion'?" in err
    code, _, err = run_chx(capsys, "prepare", "nih", table, "--classes", "cxr-lt-2024-tsk1", "-o", out)
    assert code == 2 and "did you mean 'cxr-lt-2024-task1'?" in err
    assert not out.exists()
    # A known class the dataset lacks, and a new name close to no known class, are null (said so).
    code, stdout, err = run_chx(capsys, "prepare", "nih", table, "--classes",
                                "Pleural Effusion,Support Devices,COVID-19", "-o", out)
    assert code == 0, err
    assert "warning: 2 of 3 classes are annotated by no row of nih (always null: a model cannot learn " \
           "them): Support Devices, COVID-19; --classes data" in err
    assert read_manifest(out)["Pleural Effusion"].to_list() == [1, 0, 1]


def test_images_root_is_counted_and_a_wrong_root_fails(capsys, tmp_path):
    table, out = write_nih(tmp_path / "Data_Entry_2017.csv"), tmp_path / "m.parquet"
    (tmp_path / "wrong").mkdir()
    code, _, err = run_chx(capsys, "prepare", "nih", table, "--images", tmp_path / "wrong", "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert "none of the 3 images listed in" in err and "check --images" in err
    (tmp_path / "imgs" / "images_001").mkdir(parents=True)
    (tmp_path / "imgs" / "images_001" / "b.png").write_bytes(b"x")
    code, stdout, err = run_chx(capsys, "prepare", "nih", table, "--images", tmp_path / "imgs", "-o", out)
    assert code == 0, err
    assert (f"note: images: 1 of 3 found under {tmp_path / 'imgs'}; 2 missing, kept with the table's path "
            f"(--only-existing drops them)") in stdout
    assert read_manifest(out)["path"].to_list() == ["a.png", "images_001/b.png", "c.png"]


def test_adapter_options_go_only_to_the_adapters_that_declare_them(capsys, tmp_path):
    table, out = write_nih(tmp_path / "Data_Entry_2017.csv"), tmp_path / "m.parquet"
    for args, owners in ((["--min-readers", "2"], "`chx prepare vindr`"),
                         (["--uncertain", "zeros"], "`chx prepare chexpert`, `chx prepare mimic-cxr` and "
                                                    "`chx prepare brax`"),
                         (["--label-cols", "Edema"], "`chx prepare table`")):
        code, _, err = run_chx(capsys, "prepare", "nih", table, *args, "-o", out)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{args[0]} applies only to {owners}; `chx prepare nih` does not take it" in err
    assert not out.exists()


def test_help_lists_every_adapter_option_with_its_default(capsys):
    from chx.data.adapters import merged_options

    code, stdout, _ = run_chx(capsys, "prepare", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    options = text[text.index("Options:"):]
    for opt, owners in merged_options():
        block = options[options.index(opt.flag + " "):]
        block = block[:block.index("]", block.index("[default:")) + 1]
        assert block.startswith(opt.flag) and f"{', '.join(owners)}:" in block, block
        default = opt.default_text or str(opt.default)
        assert f"[default: {default}" in block or f"[default: ({default})" in block, block
    for name in ("mimic-cxr", "padchest", "cxr-lt-2026", "brax", "table"):
        assert f" {name} " in text
