"""The CLI as users run it (issue 25): the console entry point in its own process, with its default
options (DataLoader workers included: `--workers` is never given here), under a timeout.

Each case asserts the exit status, ONE line on stderr (no traceback), that nothing was left that
looks complete, and that no process of the command's process group remains. The hang these tests
were written for: an error raised inside a DataLoader worker printed the right line and then the
process waited forever for workers that ignored the SIGTERM of Python's exit (chx.workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from chx.data.manifest import write_manifest
from helpers import ROOT, nih_subset, shared_path

TIMEOUT = 120
MODEL = ["--model", "test_convnext", "--size", "64", "--no-pretrained"]


def group_alive(pgid: int) -> list[int]:
    """Pids still alive in a process group (zombies are not alive)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def start(*args, cwd=ROOT) -> subprocess.Popen:
    """`python -m chx ARGS` in a process group of its own (as a terminal or scheduler starts it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "chx", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """Wait for the command; a hang fails here (and its group is killed) instead of eating CI's time."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chx did not exit within {timeout} s (hang); stderr: {err[-1500:]}")
    deadline = time.time() + 5        # the group's last processes are reaped by init asynchronously
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.05)
    left = group_alive(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left running after chx exited: {left}"
    return proc.returncode, out, err


def run(*args, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    return finish(start(*args), timeout)


def one_error_line(err: str, *expected: str) -> str:
    """stderr ends with exactly one `error: ...` line and holds no traceback."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------ data

BAD = {
    "truncated": lambda good: good.read_bytes()[:200],
    "empty": lambda good: b"",
    "text": lambda good: b"this is not an image\n",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory, nih_manifest):
    """40 real NIH images (30 train, 10 val) in a private folder, a stage-1 checkpoint (2 steps),
    a store extracted by it and a fusion model (2 steps): everything the commands need."""
    from chx.options import BackboneOptions, FusionOptions, TrainConfig
    from chx.pipeline.extract import extract_features
    from chx.pipeline.train_backbone import train_backbone
    from chx.pipeline.train_fusion import train_fusion

    root = tmp_path_factory.mktemp("cli")
    images, df = nih_subset(root, nih_manifest)
    (images / "bad").mkdir()
    good = images / df["path"][0]
    for kind, make in BAD.items():
        (images / "bad" / f"{kind}.png").write_bytes(make(good))
    cfg = TrainConfig(epochs=1, max_steps=2, batch_size=8, workers=0, device="cpu")
    train_backbone([root / "ok.parquet"], [images], root / "backbone",
                   BackboneOptions(model="test_convnext", size=64, pretrained=False), cfg)
    store = str(root / "ok.zarr")
    extract_features(root / "backbone" / "best.pt", root / "ok.parquet", images, store, workers=0,
                     flip=True, echo=lambda *a: None)
    train_fusion(store, root / "fusion", FusionOptions(dim=32, heads=4, ffn_dim=64), cfg)
    return {"root": root, "images": images, "df": df, "backbone": root / "backbone" / "best.pt",
            "fusion": root / "fusion" / "best.pt", "store": store}


def with_bad_image(data, tmp_path, kind: str = "truncated", split: str = "train") -> Path:
    """The manifest with the first image of ``split`` pointing at a broken file."""
    df = data["df"]
    first = df.with_row_index().filter(pl.col("split") == split)["index"][0]
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == first).then(pl.lit(f"bad/{kind}.png"))
                         .otherwise(pl.col("path")).alias("path"))
    out = tmp_path / f"bad-{kind}-{split}.parquet"
    write_manifest(df, out)
    return out


# ------------------------------------------------------------------------ bad images, every reader

@pytest.mark.parametrize("kind, split", [("truncated", "train"), ("empty", "train"), ("text", "train"),
                                         ("truncated", "val")])
def test_train_backbone_bad_image_exits_2_with_one_line_and_no_process_left(data, tmp_path, kind, split):
    """The reported hang: one bad image in the training (or validation) split under the default
    --workers 2. Before the fix: the error line, then no exit (timeout here)."""
    manifest = with_bad_image(data, tmp_path, kind, split)
    code, _, err = run("train-backbone", "--manifest", manifest, "--images", data["images"], *MODEL,
                       "--no-balance", "--epochs", "1", "--batch-size", "8", "-o", tmp_path / "run")
    assert code == 2, err[-3000:]
    one_error_line(err, f"bad/{kind}.png")
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]   # no temp file left


def test_extract_features_bad_image_exits_2_and_the_store_is_not_complete(data, tmp_path):
    from chx.store import open_store

    manifest = with_bad_image(data, tmp_path, "truncated", "val")
    store = tmp_path / "f.zarr"
    code, _, err = run("extract-features", "--checkpoint", data["backbone"], "--manifest", manifest,
                       "--images", data["images"], "--store", store)
    assert code == 2, err[-3000:]
    one_error_line(err, "bad/truncated.png")
    if store.exists():
        with open_store(str(store), mode="r") as s:
            assert not s.complete


def test_train_joint_bad_image_exits_2(data, tmp_path):
    """train-joint decodes every view of a study in its workers, for training and validation."""
    manifest = with_bad_image(data, tmp_path, "empty", "train")
    code, _, err = run("train-joint", "--manifest", manifest, "--images", data["images"], "--backbone",
                       data["backbone"], "--fusion", data["fusion"], "--epochs", "1", "--batch-size", "4",
                       "-o", tmp_path / "joint")
    assert code == 2, err[-3000:]
    one_error_line(err, "bad/empty.png")


def test_evaluate_pseudo_label_and_predict_bad_image_exit_2(data, tmp_path):
    """Every other command that decodes images in DataLoader workers, each with its defaults."""
    manifest = with_bad_image(data, tmp_path, "text", "val")
    code, _, err = run("evaluate", "--checkpoint", data["backbone"], "--manifest", manifest,
                       "--images", data["images"], "--split", "val", "-o", tmp_path / "report")
    assert code == 2, err[-3000:]
    one_error_line(err, "bad/text.png")
    assert not (tmp_path / "report").exists()

    code, _, err = run("pseudo-label", "--checkpoint", data["backbone"], "--manifest", manifest,
                       "--images", data["images"], "-o", tmp_path / "filled.parquet")
    assert code == 2, err[-3000:]
    one_error_line(err, "bad/text.png")
    assert not (tmp_path / "filled.parquet").exists()

    code, _, err = run("predict", "--backbone", data["backbone"], "--fusion", data["fusion"], "--files",
                       data["images"] / "bad" / "empty.png", data["images"] / data["df"]["path"][1],
                       "-o", tmp_path / "pred.csv")
    assert code == 2, err[-3000:]
    one_error_line(err, "empty.png")
    assert not (tmp_path / "pred.csv").exists()


def test_compare_and_explain_bad_image_exit_2(data, tmp_path):
    manifest = with_bad_image(data, tmp_path, "truncated", "val")
    code, _, err = run("compare", "--backbone", data["backbone"], "--fusion", data["fusion"], "--manifest",
                       manifest, "--images", data["images"], "--store", data["store"], "--split", "val")
    assert code == 2, err[-3000:]
    one_error_line(err, "bad/truncated.png")

    code, _, err = run("explain", "--backbone", data["backbone"], "--fusion", data["fusion"], "--files",
                       data["images"] / "bad" / "truncated.png", "-o", tmp_path / "explain")
    assert code == 2, err[-3000:]
    one_error_line(err, "truncated.png")
    assert not (tmp_path / "explain").exists()


# ------------------------------------------------------------------------------ unwritable outputs

def test_unwritable_outputs_exit_2_with_one_line(data, tmp_path):
    """An output under a path that cannot be a folder (a regular file in the way: the suite runs as
    root in CI, where permission bits do not stop writes)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ok = data["root"] / "ok.parquet"
    cases = [
        ("train-backbone", "--manifest", ok, "--images", data["images"], *MODEL, "--epochs", "1",
         "-o", blocker / "run"),
        ("extract-features", "--checkpoint", data["backbone"], "--manifest", ok, "--images", data["images"],
         "--store", blocker / "f.zarr"),
        ("evaluate", "--checkpoint", data["fusion"], "--store", data["store"], "--split", "val",
         "-o", blocker / "report"),
        ("predict", "--backbone", data["backbone"], "--fusion", data["fusion"], "--files",
         data["images"] / data["df"]["path"][1], "-o", blocker / "pred.csv"),
    ]
    for args in cases:
        code, _, err = run(*args)
        assert code == 2, (args[0], err[-3000:])
        one_error_line(err, str(blocker))
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------- signals

def wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT, text: str = "") -> None:
    """Until ``path`` exists (and holds ``text``), failing if the command ends first."""
    deadline = time.time() + timeout
    while not (path.exists() and (not text or text in path.read_text(errors="replace"))):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigterm_to_the_main_process_only_saves_last_and_ends_the_workers(data, tmp_path):
    """A scheduler that signals the main pid only (`kill PID`, `scancel` without --full): the
    workers (which ignore stop signals) are ended by the main process, not orphaned."""
    out = tmp_path / "run"
    proc = start("train-backbone", "--manifest", data["root"] / "ok.parquet", "--images", data["images"],
                 *MODEL, "--no-balance", "--batch-size", "2", "--epochs", "50", "--log-every", "1", "-o", out)
    wait_for(out / "metrics.jsonl", proc, text='"kind": "train"')   # inside the training loop
    os.kill(proc.pid, signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and err.count("last.pt saved") == 1 and "--resume" in err
    assert (out / "last.pt").exists()


def test_ctrl_c_during_extraction_exits_130_and_a_rerun_completes_the_store(tmp_path, covid_manifest,
                                                                             covid_backbone):
    """SIGINT to the whole group (Ctrl-C in a terminal) while workers decode the 391 full-size covid
    images and the writer thread writes: exit 130, no process left, the store not complete; the same
    command then finishes it."""
    from chx.store import open_store

    store = tmp_path / "f.zarr"
    args = ["extract-features", "--checkpoint", covid_backbone, "--manifest", covid_manifest,
            "--images", shared_path("covid-cxr", "images"), "--store", store, "--batch-size", "1",
            "--shard-images", "8", "--flip"]
    proc = start(*args)
    wait_for(store / "zarr.json", proc)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    code, _, err = finish(proc)
    if code in (0, -signal.SIGINT):   # -2: the signal came during the exit of a finished run
        with open_store(str(store), mode="r") as s:
            if s.complete:
                pytest.skip("the extraction finished before the signal arrived")
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    with open_store(str(store), mode="r") as s:
        assert not s.complete
    code, _, err = run(*args)
    assert code == 0, err[-3000:]
    with open_store(str(store), mode="r") as s:
        assert s.complete


def test_sigterm_during_demo_stage_1_stops_the_demo(tmp_path):
    """Issue 25, item 4: an interrupted stage stops the command that composes it (before: the demo
    went on to extract features from the half-trained model)."""
    out = tmp_path / "demo"
    proc = start("demo", "--out", out, "--studies", "60", "--size", "64", "--model", "test_convnext",
                 "--backbone-epochs", "200", "--fusion-epochs", "1")
    wait_for(out / "backbone" / "metrics.jsonl", proc, text='"kind": "train"')
    os.killpg(proc.pid, signal.SIGTERM)
    code, stdout, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "demo stopped" in err and "--resume" in err
    assert "[3/5]" not in stdout and not (out / "features.zarr").exists()
    assert (out / "backbone" / "last.pt").exists()


# ------------------------------------------------------------------------- leakage, by content

def swapped_splits(df):
    return df.with_columns(pl.when(pl.col("split") == "train").then(pl.lit("val"))
                           .otherwise(pl.lit("train")).alias("split"))


def test_leakage_is_noticed_by_content_not_by_file_name(data, tmp_path, capsys):
    """Issue 26: the leakage warning was keyed by the manifest's file name, so a renamed manifest
    with swapped splits passed. Now the checkpoint records its training split's patients (hashes)
    and every reader compares them: renamed + re-split warns, renamed + identical does not."""
    from chx.engine.compat import leakage_warning, training_patients
    from helpers import run_chx

    df = data["df"]
    ckpt = {"train_patients": training_patients(df)}
    assert leakage_warning(ckpt, df, "same.parquet", "best.pt") is None
    message = leakage_warning(ckpt, swapped_splits(df), "other.parquet", "best.pt")
    n_train = df.filter(pl.col("split") == "train")["subject_id"].n_unique()
    assert message.startswith(f"warning: {n_train} patient(s) outside the training split of other.parquet")
    assert "patient leakage" in message

    write_manifest(df, tmp_path / "renamed.parquet")
    write_manifest(swapped_splits(df), tmp_path / "resplit.parquet")
    for name, leaks in (("renamed", False), ("resplit", True)):
        code, out, err = run_chx(capsys, "extract-features", "--checkpoint", data["backbone"], "--manifest",
                                 tmp_path / f"{name}.parquet", "--images", data["images"], "--store",
                                 tmp_path / f"{name}.zarr", "--workers", "0")
        assert code == 0, err
        assert ("patient leakage" in out + err) == leaks, (name, out, err)
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", data["backbone"], "--manifest",
                           tmp_path / "resplit.parquet", "--images", data["images"], "--split", "val",
                           "--workers", "0", "-o", tmp_path / "report")
    assert code == 0 and "patient leakage" in err, err
