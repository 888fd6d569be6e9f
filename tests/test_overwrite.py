"""One overwrite rule for every output (issue 26, item 1): ``--overwrite`` replaces only an output of
the command's own kind that chx provably made (a folder with chx's marker ``.chx-output.json`` and
no file it does not list; a file whose content is of that kind) and refuses anything else by name,
with one line and exit 2, leaving it intact. Also: the lock on an evaluation's report folder, temp
files of dead writers removed, JSON never holding a bare NaN, class names escaped in Markdown."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from chx.atomic import (MARKER, atomic_dir, atomic_path, check_output, json_text, output_lock,
                        remove_stale_temps, write_marker)
from chx.data.manifest import read_manifest, write_manifest
from chx.errors import ChxError
from helpers import ROOT, one_line, run_chx, shared_path


def snapshot(path):
    """Every file under ``path`` (or the file itself) with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory, covid_backbone, covid_models, covid_manifest):
    """The models, a bundle, a 6-image manifest and the victims: things no command may replace."""
    tmp = tmp_path_factory.mktemp("overwrite")
    from chx.pipeline.export import export_bundle

    bundle = tmp / "model.chx"
    export_bundle(covid_backbone, covid_models["fusion"], bundle)
    val = tmp / "val.parquet"
    write_manifest(read_manifest(covid_manifest).filter(pl.col("split") == "val").head(6), val)
    victims = tmp / "victims"
    project = victims / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("my notes")
    (project / "src" / "a.py").write_text("print(1)")
    shutil.copytree(covid_backbone.parent, victims / "run")                  # a run folder (best.pt, ...)
    shutil.copytree(covid_models["store"], victims / "store.zarr")           # a feature store
    (victims / "notes.txt").write_text("not chx's")                          # a file of another kind
    read_manifest(val).write_csv(victims / "manifest.csv")                   # a chx manifest (csv)
    shutil.copy(covid_backbone, victims / "best.pt")                         # a backbone checkpoint
    return {"tmp": tmp, "bundle": bundle, "val": val, "images": shared_path("covid-cxr", "images"),
            "backbone": covid_backbone, "fusion": covid_models["fusion"], "store": covid_models["store"],
            "manifest": covid_manifest, "victims": victims}


def command(env, name, out, overwrite=True):
    """The arguments of command ``name`` writing ``out``, valid but for ``out``."""
    pair = ["--backbone", env["backbone"], "--fusion", env["fusion"]]
    data = ["--manifest", env["val"], "--images", env["images"]]
    args = {
        "export": ["export", *pair, "-o", out],
        "export-hf": ["export", *pair, "--format", "hf", "-o", out],
        "export-onnx": ["export", *pair, "--format", "onnx", "-o", out],
        "explain": ["explain", "--bundle", env["bundle"], *data, "--top-k", "1", "-o", out],
        "predict": ["predict", "--bundle", env["bundle"], *data, "-o", out],
        "predict-explain": ["predict", "--bundle", env["bundle"], *data, "-o", out.parent / f"{out.name}.csv",
                            "--explain", out],
        "evaluate": ["evaluate", "--checkpoint", env["fusion"], "--store", env["store"], "--split", "val",
                     "-o", out],
        "compare": ["compare", *pair, "--manifest", env["manifest"], "--images", env["images"], "--store",
                    env["store"], "-o", out],
        "import-reference": ["import-reference", env["tmp"] / "nonexistent.ckpt", "--kind", "backbone",
                             "--classes", "a,b", "-o", out],
        "prepare": ["prepare", "nih", shared_path("metadata", "nih_data_entry_2017_v2020.csv.gz"), "-o", out],
        "demo": ["demo", "-o", out],
    }[name]
    return args + (["--overwrite"] if overwrite and name != "demo" else [])


FOLDER_COMMANDS = ["export-hf", "export-onnx", "explain", "predict-explain", "evaluate", "demo"]
FILE_COMMANDS = ["export", "predict", "compare", "import-reference", "prepare"]
VICTIMS = ["project", "run", "store.zarr", "notes.txt"]


@pytest.mark.parametrize("victim", VICTIMS)
@pytest.mark.parametrize("name", FOLDER_COMMANDS + FILE_COMMANDS)
def test_overwrite_never_replaces_what_chx_did_not_write(capsys, env, name, victim):
    target = env["victims"] / victim
    before = snapshot(target)
    code, _, err = run_chx(capsys, *command(env, name, target))
    assert code == 2 and "Traceback" not in err, err
    assert victim in err                                         # refused by name
    if (name in FOLDER_COMMANDS) == target.is_dir():            # else click's own "is a directory/file"
        one_line(code, err, "is not", "chx wrote", "refusing to replace it")
    assert snapshot(target) == before                            # intact


@pytest.mark.parametrize("name, victim, reason", [
    ("export", "best.pt", "it is a backbone checkpoint"),        # a run's checkpoint is not a bundle
    ("import-reference", "model.chx", "it is a bundle checkpoint"),
    ("predict", "manifest.csv", "not a predictions table"),      # a manifest is not predictions
    ("prepare", "notes.txt", "not a chx manifest"),
    ("compare", "notes.txt", "not a comparison table"),
])
def test_file_outputs_replace_only_a_file_of_their_kind(capsys, env, name, victim, reason):
    target = env["bundle"] if victim == "model.chx" else env["victims"] / victim
    before = snapshot(target)
    one_line(*run_chx(capsys, *command(env, name, target))[::2], target.name, reason)
    assert snapshot(target) == before


def test_a_folder_of_another_output_kind_or_with_added_files_is_refused(capsys, env, tmp_path):
    hf = tmp_path / "model-hf"
    assert run_chx(capsys, *command(env, "export-hf", hf, overwrite=False))[0] == 0
    marker = json.loads((hf / MARKER).read_text())
    assert marker["kind"] == "export-hf"
    assert sorted(marker["files"]) == ["README.md", "config.json", "model.safetensors"]
    code, _, err = run_chx(capsys, *command(env, "explain", hf))          # explain over an hf export
    one_line(code, err, "model-hf", "it is a Hugging Face export folder chx wrote")
    code, _, err = run_chx(capsys, *command(env, "export-hf", hf, overwrite=False))
    one_line(code, err, "already holds a Hugging Face export folder", "--overwrite")
    (hf / "my-notes.md").write_text("added by the user")
    code, _, err = run_chx(capsys, *command(env, "export-hf", hf))
    one_line(code, err, "files chx did not write there: my-notes.md")
    assert (hf / "my-notes.md").read_text() == "added by the user"
    (hf / "my-notes.md").unlink()
    (hf / MARKER).unlink()                                                # no marker: not provably chx's
    one_line(*run_chx(capsys, *command(env, "export-hf", hf))[::2], "did not write")


@pytest.mark.parametrize("name, out", [
    ("export", "m.chx"), ("export-hf", "hf"), ("explain", "ex"), ("predict", "p.csv"), ("predict", "p.json"),
    ("predict-explain", "pex"), ("evaluate", "eval"),
])
def test_overwrite_replaces_the_commands_own_previous_output(capsys, env, tmp_path, name, out):
    out = tmp_path / out
    assert run_chx(capsys, *command(env, name, out, overwrite=False))[0] == 0
    code, _, err = run_chx(capsys, *command(env, name, out, overwrite=False))
    one_line(code, err, out.name, "already holds", "--overwrite")
    code, _, err = run_chx(capsys, *command(env, name, out))
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp, no lock left
    if out.is_dir():
        assert json.loads((out / MARKER).read_text())["kind"] in ("explain", "export-hf", "report")


def test_compare_refuses_then_replaces_its_own_table(capsys, env, tmp_path):
    out = tmp_path / "cmp.md"
    assert run_chx(capsys, *command(env, "compare", out, overwrite=False))[0] == 0
    one_line(*run_chx(capsys, *command(env, "compare", out, overwrite=False))[::2], "already holds", "--overwrite")
    assert run_chx(capsys, *command(env, "compare", out))[0] == 0
    json.loads(out.with_suffix(".json").read_text())
    (tmp_path / "b.md").write_text("| method | studies | mAP |\n")
    (tmp_path / "b.json").write_text('{"x": 1}')            # the .json beside it is not a comparison
    one_line(*run_chx(capsys, *command(env, "compare", tmp_path / "b.md"))[::2], "b.json", "not a comparison")


def test_the_rule_on_files_and_markers_directly(tmp_path, env):
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, "explain", False)                 # an empty folder: nothing to lose
    demo = tmp_path / "demo"
    demo.mkdir()
    write_marker(demo, "demo")
    (demo / "anything").write_text("x")                   # the demo folder owns everything under it
    check_output(demo, "demo", True)
    check_output(env["victims"] / "manifest.csv", "manifest", True)
    check_output(env["victims"] / "best.pt", "checkpoint", True)    # import-reference may replace a model
    with pytest.raises(ChxError, match="it is a file"):
        check_output(env["victims"] / "notes.txt", "report", True)
    with pytest.raises(ChxError, match="it is a folder"):
        check_output(demo, "predictions", True)
    with pytest.raises(ChxError, match="it is a training run folder"):
        check_output(env["victims"] / "run", "report", True)
    with pytest.raises(ChxError, match="it is a feature store"):
        check_output(env["victims"] / "store.zarr", "export-onnx", True, option="--explain")
    # atomic_dir re-checks before replacing: a folder that is not its kind is never removed
    with pytest.raises(ChxError, match="refusing"):
        with atomic_dir(demo, "explain") as tmp:
            (tmp / "x.png").write_text("x")
    assert (demo / "anything").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ one stderr line from the real process

@pytest.mark.parametrize("name, victim", [("explain", "project"),        # a folder output
                                          ("predict", "notes.txt"),       # a file output
                                          ("demo", "run")])               # a folder replaced without a flag
def test_refusal_as_a_subprocess(env, name, victim):
    target = env["victims"] / victim
    before = snapshot(target)
    args = [str(a) for a in command(env, name, target)]
    p = subprocess.run([sys.executable, "-m", "chx", *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and str(target) in lines[0] and "refusing to replace it" in lines[0], p.stderr
    assert snapshot(target) == before


# ------------------------------------------------------------------ weak cases of issue 26

def test_two_evaluations_into_one_folder_do_not_race(capsys, env, tmp_path):
    out = tmp_path / "eval"
    args = command(env, "evaluate", out)
    assert run_chx(capsys, *args)[0] == 0
    before = snapshot(out)
    with output_lock(out, "report"):                           # another evaluation is writing it
        one_line(*run_chx(capsys, *args)[::2], "another chx process is writing", "eval")
        with pytest.raises(ChxError, match="another chx process"):
            with output_lock(out, "report"):
                pass
    assert snapshot(out) == before
    assert not (tmp_path / ".eval.lock").exists()              # the lock file goes with the lock
    assert run_chx(capsys, *args)[0] == 0


@pytest.mark.parametrize("extra", [["--checkpoint", "x.pt"], ["-o", "r"], ["--overwrite"], ["--store", "s.zarr"]])
def test_evaluate_compare_refuses_options_it_would_ignore(capsys, tmp_path, extra):
    code, _, err = run_chx(capsys, "evaluate", "--compare", tmp_path / "a", tmp_path / "b", *extra)
    one_line(code, err, extra[0], "--compare")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_files_carry_the_pid_and_dead_writers_temps_are_removed(tmp_path):
    target = tmp_path / "p.csv"
    dead = _dead_pid()
    stale_file = tmp_path / f".p.csv.tmp-{dead}-abc.tmp"
    stale_file.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / f".p.csv.tmp-{dead}-xyz"
    (stale_dir / "sub").mkdir(parents=True)
    live = tmp_path / f".p.csv.tmp-{os.getpid()}-live.tmp"     # a live writer's (ours): kept
    live.write_text("x")
    other = tmp_path / f".q.csv.tmp-{dead}-abc.tmp"            # another target's: not this write's business
    other.write_text("x")
    with atomic_path(target) as tmp:
        assert f".tmp-{os.getpid()}-" in tmp.name
        tmp.write_text("study_id\n")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists() and target.read_text() == "study_id\n"
    stale_dir.mkdir()
    with atomic_dir(tmp_path / "p.csv2", "explain") as tmp:
        assert f".tmp-{os.getpid()}-" in tmp.name
    remove_stale_temps(target)
    assert not stale_dir.exists()


def test_json_chx_writes_is_valid_json():
    text = json_text({"loss": float("nan"), "x": [np.float32("inf"), np.float64(0.5)], "n": np.int64(3)})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == \
        {"loss": None, "x": [None, 0.5], "n": 3}


def test_class_names_are_escaped_in_markdown(env):
    from chx.cli import _option_specs, cli
    from chx.pipeline.export import bundle_of, model_card
    from chx.pipeline.report import md_cell, summary_table

    evil = "Effusion | <script>alert(1)</script>"
    assert md_cell(evil) == "Effusion \\| &lt;script&gt;alert(1)&lt;/script&gt;"
    bundle = bundle_of(env["backbone"], env["fusion"])
    bundle["class_names"] = [evil] + list(bundle["class_names"])[1:]
    card = model_card(bundle, env["tmp"] / "hf", {n: _option_specs(c) for n, c in cli.commands.items()})
    assert "<script>" not in card and "| 0 | Effusion \\| &lt;script&gt;" in card
    result = {"per_class": {evil: {"ap": 0.5, "train_count": 3}}, "mAP": 0.5}
    table = summary_table(result)
    assert "<script>" not in table and all(line.count(" | ") == 8 for line in table.splitlines()[-1:])
