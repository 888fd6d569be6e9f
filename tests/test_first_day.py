"""Issue 32 (the first day on real data): prepare defaults to the dataset's own classes and warns
about classes no row annotates; the manifest remembers its images root; `--resume -o RUN` alone
reads the run's options; shared outputs (model card, explain.json) carry no absolute path; the
"wrong store" message names expected and found the right way round; every progress line shows
the loss."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from chx.data.adapters.chexpert import CHEXPERT_CLASSES
from chx.data.classes import CXR_LT_2023
from chx.data.manifest import (class_columns, images_root, portable_path, read_manifest,
                               recorded_images_root, write_manifest)
from chx.errors import ChxError
from chx.models import load_checkpoint
from helpers import ROOT, TINY, run_chx, shared_path


def one_line(code: int, err: str, text: str) -> None:
    assert code == 2, err
    assert text in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ 2: default classes, warning

@pytest.fixture(scope="module")
def chexpert_small(tmp_path_factory) -> Path:
    """The first 100 rows of the real CheXpert train table (every one of its 14 labels annotated), in
    its native format."""
    with gzip.open(shared_path("metadata", "chexpert_train.csv.gz"), "rt") as f:
        lines = [next(f) for _ in range(101)]
    path = tmp_path_factory.mktemp("chexpert") / "train.csv"
    path.write_text("".join(lines))
    return path


def write_nih(path: Path) -> Path:
    rows = (("a.png", "Effusion", "1", "PA"), ("b.png", "No Finding", "2", "AP"),
            ("c.png", "Cardiomegaly|Effusion", "2", "PA"))
    path.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,View Position\n"
                    + "".join(f"{i},{f},0,{p},{v}\n" for i, f, p, v in rows))
    return path


def test_chexpert_defaults_to_its_own_14_classes_without_a_warning(capsys, tmp_path, chexpert_small):
    out = tmp_path / "c.parquet"
    code, stdout, err = run_chx(capsys, "prepare", "chexpert", chexpert_small, "-o", out)
    assert code == 0, err
    assert class_columns(read_manifest(out)) == list(CHEXPERT_CLASSES)
    assert "warning" not in err and "14 classes" in stdout
    # a subset that lacks a class: warned, without suggesting `--classes data` (already in use)
    few = tmp_path / "few.csv"
    few.write_text("".join(chexpert_small.read_text().splitlines(keepends=True)[:41]))
    code, _, err = run_chx(capsys, "prepare", "chexpert", few, "-o", tmp_path / "few.parquet")
    assert code == 0, err
    assert "warning: 2 of 14 classes are annotated by no row of chexpert" in err and "--classes data" not in err


def test_a_list_the_dataset_cannot_fill_warns_once_naming_the_unannotated(capsys, tmp_path, chexpert_small):
    out = tmp_path / "c.parquet"
    code, _, err = run_chx(capsys, "prepare", "chexpert", chexpert_small, "--classes", "cxr-lt-2023", "-o", out)
    assert code == 0, err
    df = read_manifest(out)
    never = [c for c in CXR_LT_2023 if c not in CHEXPERT_CLASSES]
    assert len(never) == 12 and all(df[c].null_count() == df.height for c in never)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"12 of 26 classes are annotated by no row of chexpert" in warnings[0]
    assert all(c in warnings[0] for c in never) and "--classes data" in warnings[0]


def test_nih_defaults_to_its_own_names_and_the_challenge_tables_keep_theirs(capsys, tmp_path):
    from chx.data.adapters import ADAPTERS

    out = tmp_path / "n.parquet"
    code, _, err = run_chx(capsys, "prepare", "nih", write_nih(tmp_path / "Data_Entry_2017.csv"), "-o", out)
    assert code == 0, err
    assert "Effusion" in class_columns(read_manifest(out)) and "warning" not in err
    assert ADAPTERS["cxr-lt"].default_classes == "cxr-lt-2023"
    assert ADAPTERS["cxr-lt-2026"].default_classes == "cxr-lt-2026"
    code, stdout, _ = run_chx(capsys, "prepare", "--help")
    assert "[default: data; cxr-lt-2023 for cxr-lt, mimic-cxr; cxr-lt-2026 for" in " ".join(stdout.split())


# ------------------------------------------------------------------ 7: the images root remembered

def test_prepare_records_the_images_root(covid_manifest):
    record = recorded_images_root(covid_manifest)
    assert record["given"] == str(shared_path("covid-cxr", "images"))
    assert images_root(covid_manifest) == shared_path("covid-cxr", "images")
    assert images_root(covid_manifest, "elsewhere") == Path("elsewhere")       # --images overrides


def _nih_with_images(folder: Path) -> Path:
    (folder / "imgs").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(shared_path("nih-64px", "images", "00000001_000.png"), folder / "imgs" / name)
    return write_nih(folder / "Data_Entry_2017.csv")


def test_a_relative_root_travels_with_the_manifest_and_a_missing_one_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = _nih_with_images(tmp_path / "project")
    code, _, err = run_chx(capsys, "prepare", "nih", table, "--images", "project/imgs", "-o", "project/m.parquet")
    assert code == 0, err
    assert recorded_images_root("project/m.parquet") == {"given": "project/imgs", "relative": "imgs"}
    shutil.move(tmp_path / "project", tmp_path / "moved")          # manifest and images moved together
    assert images_root(tmp_path / "moved" / "m.parquet").resolve() == (tmp_path / "moved" / "imgs").resolve()
    shutil.rmtree(tmp_path / "moved" / "imgs")
    with pytest.raises(ChxError, match=r"m\.parquet: its images root project/imgs .* no longer exists; "
                                       r"give --images ROOT"):
        images_root(tmp_path / "moved" / "m.parquet")
    df = read_manifest(tmp_path / "moved" / "m.parquet")
    write_manifest(df, tmp_path / "m.csv")                          # CSV: nothing recorded
    with pytest.raises(ChxError, match="records no images root"):
        images_root(tmp_path / "m.csv")


def test_commands_without_images_use_the_recorded_root(capsys, tmp_path, covid_backbone, covid_manifest):
    out = tmp_path / "eval"
    code, stdout, err = run_chx(capsys, "evaluate", "--checkpoint", covid_backbone, "--manifest", covid_manifest,
                                "--split", "val", "--thresholds-from", "none", "--workers", "0", "-o", out)
    assert code == 0, err
    assert (out / "metrics.json").is_file()
    # a manifest without a recorded root: the one line names what to give
    bare = tmp_path / "bare.parquet"
    write_manifest(read_manifest(covid_manifest), bare)
    code, _, err = run_chx(capsys, "extract-features", "--checkpoint", covid_backbone, "--manifest", bare,
                           "--store", tmp_path / "s.zarr", "--workers", "0")
    one_line(code, err, "records no images root (prepared without --images, or a CSV manifest); give --images")
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------ 5: resume by the run folder

RUN = ["--batch-size", "8", "--epochs", "0.12", "--log-every", "1", "--val-every", "0.5"]   # 5 steps


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "last.pt")["state_dict"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, covid_manifest):
    """A 4-step train-backbone run, uninterrupted (no --images: the manifest's recorded root)."""
    from chx.cli import main

    out = tmp_path_factory.mktemp("full") / "run"
    main(["train-backbone", "--manifest", str(covid_manifest), *TINY, *RUN, "-o", str(out)])
    return out


def test_resume_by_folder_alone_equals_the_uninterrupted_run(capsys, tmp_path, covid_manifest, full_run,
                                                             monkeypatch):
    from chx.engine.run_folder import RunFolder

    log = RunFolder.log

    def interrupt_after_step_2(self, record):   # SIGINT, as Ctrl-C, right after step 2
        log(self, record)
        if record.get("kind") == "train" and record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(RunFolder, "log", interrupt_after_step_2)
    cut = tmp_path / "cut"
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", covid_manifest, *TINY, *RUN, "-o", cut)
    assert code == 128 + signal.SIGINT, err
    assert load_checkpoint(cut / "last.pt")["step"] == 2
    monkeypatch.undo()

    r = subprocess.run([sys.executable, "-m", "chx", "train-backbone", "--resume", "-o", str(cut)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       # the thread count of the in-process runs it is compared with, bit for bit
                       env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 5 steps" in r.stdout
    full, resumed = _weights(full_run), _weights(cut)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_by_folder_takes_matching_options_and_refuses_others(capsys, full_run):
    code, stdout, err = run_chx(capsys, "train-backbone", "--resume", "-o", full_run, "--batch-size", "8",
                                "--workers", "0")
    assert code == 0, err
    assert "trained 5 steps" in stdout
    code, _, err = run_chx(capsys, "train-backbone", "--resume", "-o", full_run, "--lr", "1e-3")
    one_line(code, err, "option(s) differ")
    assert "--lr 3e-05 -> 0.001" in err


@pytest.mark.parametrize("command", ["train-backbone", "train-fusion", "train-joint"])
def test_resume_of_a_folder_without_a_run_is_one_line(capsys, tmp_path, command):
    code, _, err = run_chx(capsys, command, "--resume", f"--out={tmp_path / 'none'}")
    one_line(code, err, f"--resume: {tmp_path / 'none' / 'config.json'} does not exist, so")
    assert "Missing option" not in err and not (tmp_path / "none").exists()


def test_fusion_resumes_by_folder_to_the_same_weights(capsys, tmp_path, covid_models):
    args = ["train-fusion", "--store", covid_models["store"], "--dim", "32", "--heads", "4", "--ffn-dim", "64",
            "--batch-size", "8", "--workers", "0", "--val-every", "0.5"]
    assert run_chx(capsys, *args, "--max-steps", "4", "-o", tmp_path / "full")[0] == 0
    assert run_chx(capsys, *args, "--max-steps", "2", "-o", tmp_path / "part")[0] == 0
    code, stdout, err = run_chx(capsys, "train-fusion", "--resume", "-o", tmp_path / "part", "--max-steps", "4")
    assert code == 0, err
    assert "trained 4 steps" in stdout
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)


# ------------------------------------------------------------------ 6: no absolute path shared

ABSOLUTE = re.compile(r"(^|[\s`'\"(=:])/[A-Za-z]")


def _no_machine_paths(text: str) -> None:
    assert not ABSOLUTE.search(text), ABSOLUTE.search(text).string[max(0, ABSOLUTE.search(text).start() - 80):
                                                                   ABSOLUTE.search(text).start() + 80]
    for private in (str(Path.home()), str(shared_path()), "/tmp/"):
        assert private not in text, private


def test_model_card_holds_no_absolute_path(capsys, tmp_path, covid_backbone, covid_models):
    out = tmp_path / "hf"
    code, _, err = run_chx(capsys, "export", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                           "--format", "hf", "-o", out)
    assert code == 0, err
    card = (out / "README.md").read_text()
    _no_machine_paths(card)
    _no_machine_paths((out / "config.json").read_text())
    assert "--fusion fusion/best.pt" in card and "chx train-backbone" in card


def test_portable_path_variants(tmp_path):
    assert portable_path(tmp_path / "a" / "b.png", tmp_path) == "a/b.png"
    assert portable_path(tmp_path / "a" / "b.png", None, tmp_path / "a") == "b.png"
    assert portable_path("runs/b/best.pt") == "runs/b/best.pt"            # relative, kept
    assert portable_path("../data/x.png") == "x.png"                     # climbs out: the name
    assert portable_path("/data/sets/x/best.pt", keep=2) == "x/best.pt"
    assert portable_path(Path.home() / "best.pt", keep=2) == "best.pt"    # never the home folder
    assert portable_path("memory://store") == "memory://store"


def test_explain_json_names_files_relative_to_the_images_root(capsys, tmp_path, covid_backbone, covid_models,
                                                              covid_manifest):
    m = read_manifest(covid_manifest)
    small = tmp_path / "small.parquet"
    write_manifest(m.filter(pl.col("split") == "val").head(2), small,
                   images_root=shared_path("covid-cxr", "images"))
    out = tmp_path / "ex"
    code, _, err = run_chx(capsys, "explain", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                           "--manifest", small, "--top-k", "1", "-o", out)
    assert code == 0, err
    text = (out / "explain.json").read_text()
    _no_machine_paths(text)
    files = [v["file"] for s in json.loads(text)["studies"] for v in s["views"]]
    assert files and set(files) <= set(m["path"])                        # the manifest's own paths
    # files given directly: relative to the folder holding the output
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(shared_path("covid-cxr", "images", files[0]), study / "x.png")
    code, _, err = run_chx(capsys, "explain", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                           "--files", study / "x.png", "--top-k", "1", "-o", tmp_path / "ex2")
    assert code == 0, err
    doc = json.loads((tmp_path / "ex2" / "explain.json").read_text())
    assert doc["studies"][0]["views"][0]["file"] == "study/x.png"


# ------------------------------------------------------------------ 7: messages and progress

def test_wrong_store_message_names_this_store_and_the_training_store_in_order(covid_models,
                                                                             covid_reference_store):
    from chx.engine.compat import check_fusion_store

    ckpt = load_checkpoint(covid_models["fusion"])
    with pytest.raises(ChxError) as e:
        check_fusion_store(ckpt, "f.pt", str(covid_reference_store))   # no --flip, shards of 8
    msg = str(e.value)
    assert "flip False in this store vs True in the training store" in msg, msg
    assert "\n" not in msg


def test_every_progress_line_shows_the_last_loss(monkeypatch):
    import chx.engine.trainer as trainer

    lines = []
    monkeypatch.setattr(trainer, "warn", lines.append)
    p = trainer._Progress(total=4, initial=0, desc="train", every=0.0, items_per_step=8, enabled=False)
    p.lines = True
    for step, loss in ((1, 0.5), (2, None), (3, None), (4, 0.25)):
        p.update(step, 4, loss)
    p.close()
    assert [re.search(r"loss (\S+),", line).group(1) for line in lines] == ["0.5000", "0.5000", "0.5000", "0.2500"]
