"""Bad input, as users make it: each case exits with code 2 and ONE line that names the file, row
or option and says what to do; no traceback, and nothing written that looks complete.

The table: (case id, how to break the input, command, expected text in the message).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from helpers import TINY, nih_subset, run_chx, shared_path


@pytest.fixture(scope="module")
def base(tmp_path_factory, nih_manifest):
    """A small valid manifest over a private copy of 40 real NIH images (which the cases break)."""
    root = tmp_path_factory.mktemp("bad")
    images, df = nih_subset(root, nih_manifest)
    return {"root": root, "images": images, "df": df}


def manifest_with(base, tmp_path, change) -> Path:
    df = change(base["df"].clone())
    out = tmp_path / "m.csv"
    df.write_csv(out)
    return out


def first_image(base) -> Path:
    return base["images"] / base["df"]["path"][0]


def col(name, values):
    return lambda df: df.with_columns(pl.Series(name, values(df)))


def set_first(name, value, dtype=pl.Utf8):
    return lambda df: df.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(value, dtype)).otherwise(pl.col(name).cast(dtype)).alias(name))


MANIFEST_CASES = [
    ("missing-column", lambda df: df.drop("view"), "missing column(s) view"),
    ("duplicate-id", lambda df: df.with_columns(pl.lit("same").alias("image_id")), "duplicate image_id 'same'"),
    ("text-label", set_first("Edema", "yes"), "label 'yes' is not a number"),
    ("label-2", set_first("Edema", 2.0, pl.Float64), "label 2.0 is not allowed"),
    ("label-minus-1", set_first("Edema", -1.0, pl.Float64), "label -1.0 is not allowed"),
    ("unknown-view", set_first("view", "SIDEWAYS"), "unknown view 'SIDEWAYS'"),
    ("unknown-split", set_first("split", "dev"), "unknown split 'dev'"),
    ("path-escapes-root", set_first("path", "../../etc/passwd"), "leaves the images root"),
    ("absolute-path", set_first("path", "/etc/passwd"), "leaves the images root"),
    ("empty-image-id", set_first("image_id", " "), "column image_id: empty value"),
    ("study-label-disagreement", lambda df: df.with_columns(pl.lit("S").alias("study_id"),
                                                           pl.lit("P").alias("subject_id"),
                                                           pl.lit("train").alias("split")),
     "has images with different labels"),
    ("patient-in-two-splits", lambda df: df.with_columns(pl.lit("P").alias("subject_id")),
     "appears in more than one split"),
    ("more-than-100-views", lambda df: pl.concat([df] * 3).with_columns(
        pl.format("img{}", pl.int_range(pl.len())).alias("image_id"), pl.lit("S").alias("study_id"),
        pl.lit("P").alias("subject_id"), pl.lit("train").alias("split"),
        *[pl.lit(0.0).alias(c) for c in ("Edema", "Hernia")]).select(df.columns), "more than 100"),
    ("no-rows", lambda df: df.head(0), "has no rows"),
    ("no-training-rows", lambda df: df.with_columns(pl.lit("val").alias("split")), "no training rows"),
]


@pytest.mark.parametrize("case, change, expected", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest(capsys, tmp_path, base, case, change, expected):
    m = manifest_with(base, tmp_path, change)
    out = tmp_path / "run"
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", m, "--images", base["images"], *TINY,
                           "--max-steps", "1", "-o", out)
    assert_one_line(code, err, expected)
    assert not (out / "last.pt").exists()


def break_image(kind):
    def apply(base, tmp_path):
        images = tmp_path / "images"
        shutil.copytree(base["images"], images)
        target = images / base["df"]["path"][0]
        if kind == "not-an-image":
            target.write_text("this is a text file, not a PNG\n")
        elif kind == "truncated-png":
            target.write_bytes(target.read_bytes()[:200])
        elif kind == "missing":
            target.unlink()
        elif kind == "bomb":
            Image.fromarray(np.zeros((4000, 4000), np.uint8)).save(target)
        elif kind == "empty-file":
            target.write_bytes(b"")
        return images, target.name
    return apply


IMAGE_CASES = [("not-an-image", "not"), ("truncated-png", "truncated"), ("missing", "missing"),
               ("bomb", "pixels"), ("empty-file", "is empty (0 bytes)")]


@pytest.mark.parametrize("kind, expected", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_image_names_the_file(capsys, tmp_path, base, monkeypatch, kind, expected, workers):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1_000_000)
    images, name = break_image(kind)(base, tmp_path)
    out = tmp_path / "run"
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", base["root"] / "ok.parquet", "--images",
                           images, *TINY[:-2], "--workers", workers, "--max-steps", "3", "--no-balance",
                           "--batch-size", "10", "-o", out)
    assert_one_line(code, err, expected)
    assert name in err


OPTION_CASES = [
    (["train-backbone", "--lr", "-1"], "--lr -1.0 must be > 0"),
    (["train-backbone", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["train-backbone", "--epochs", "0"], "--epochs 0.0 must be > 0"),
    (["train-backbone", "--warmup", "2"], "--warmup 2.0 must be a fraction"),
    (["train-backbone", "--ema", "1.5"], "--ema 1.5 must be a decay"),
    (["train-backbone", "--val-every", "0"], "--val-every 0.0 must be > 0"),
    (["train-backbone", "--grad-accum", "0"], "--grad-accum 0 must be >= 1"),
    (["train-fusion", "--max-views", "0"], "--max-views"),
    (["train-fusion", "--dropout", "1.5"], "--dropout 1.5"),
    (["extract-features", "--shard", "3/2"], "--shard 3/2"),
    (["extract-features", "--shard", "half"], "--shard 'half'"),
    (["extract-features", "--pool", "0"], "--pool 0"),
    (["prepare", "--val-fraction", "1.5"], "--val-fraction 1.5 is out of range"),
    (["prepare", "--val-fraction", "0.6", "--test-fraction", "0.5"], "leaves no training data"),
    (["prepare-unknown"], "unknown dataset"),
]


@pytest.mark.parametrize("args, expected", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_option_out_of_range(capsys, tmp_path, base, covid_backbone, args, expected):
    cmd, extra = args[0], args[1:]
    out = tmp_path / "out"
    if cmd == "train-backbone":
        full = [cmd, "--manifest", base["root"] / "ok.parquet", "--images", base["images"], *TINY, *extra, "-o", out]
    elif cmd == "train-fusion":
        full = [cmd, "--store", tmp_path / "nostore.zarr", *extra, "-o", out]
    elif cmd == "extract-features":
        full = [cmd, "--checkpoint", covid_backbone, "--manifest", shared_path("covid-cxr", "metadata.csv"),
                "--images", base["images"], "--store", out, *extra]
    elif cmd == "prepare":
        full = [cmd, "nih", shared_path("metadata", "nih_data_entry_2017_v2020.csv.gz"), *extra, "-o", out]
    else:
        full = ["prepare", "no-such-dataset", base["root"], "-o", out]
        expected = "no-such-dataset"
    code, _, err = run_chx(capsys, *full)
    assert_one_line(code, err, expected)
    if out.is_dir():
        assert not any(out.iterdir()), f"{out} holds {sorted(p.name for p in out.iterdir())}"
    else:
        assert not out.exists()


def test_checkpoint_problems(capsys, tmp_path, base, covid_backbone, covid_manifest):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(covid_backbone.read_bytes()[:5000])
    for ckpt, expected in ((truncated, "truncated, corrupt"), (tmp_path / "none.pt", "does not exist"),
                           (base["root"] / "ok.parquet", "truncated, corrupt")):
        code, _, err = run_chx(capsys, "pseudo-label", "--checkpoint", ckpt, "--manifest", covid_manifest,
                               "--images", shared_path("covid-cxr", "images"), "-o", tmp_path / "p.parquet")
        assert_one_line(code, err, expected)
    # A manifest whose classes differ from the checkpoint's.
    code, _, err = run_chx(capsys, "pseudo-label", "--checkpoint", covid_backbone, "--manifest",
                           base["root"] / "ok.parquet", "--images", base["images"], "-o", tmp_path / "p.parquet")
    assert_one_line(code, err, "prepare the manifest onto the checkpoint's classes")
    code, _, err = run_chx(capsys, "extract-features", "--checkpoint", covid_backbone, "--manifest",
                           base["root"] / "ok.parquet", "--images", base["images"], "--store", tmp_path / "s.zarr")
    assert_one_line(code, err, "other classes")
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "s.zarr").exists()


def assert_one_line(code, err, expected):
    # Warnings (e.g. classes without training positives) may come first; the error is one line.
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
