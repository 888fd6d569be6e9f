"""SIGINT / SIGTERM during training: a resumable last.pt is written, the exit is clean, and
--resume continues with the same losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chx.models import load_checkpoint
from helpers import ROOT, TINY, run_chx, shared_path


def train_losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


STEPS = 30
ARGS = ["--batch-size", "8", "--max-steps", str(STEPS), "--log-every", "1", "--val-every", "10"]


def train_args(nih_manifest):
    return ["train-backbone", "--manifest", str(nih_manifest), "--images", str(shared_path("nih-64px", "images")),
            *TINY, *ARGS]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, nih_manifest):
    """The losses of the run uninterrupted (computed once for both signals)."""
    out = tmp_path_factory.mktemp("full") / "full"
    from chx.cli import main

    try:
        main(train_args(nih_manifest) + ["-o", str(out)])
    except SystemExit as e:
        assert not e.code
    return train_losses(out)


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["sigint", "sigterm-to-the-process-group-with-workers"])
def test_signal_saves_last_and_resume_matches_uninterrupted(capsys, tmp_path, nih_manifest, uninterrupted, sig,
                                                            group):
    """SIGTERM goes to the whole process group, as `timeout` and job schedulers send it, with
    DataLoader workers running: they ignore it and the main process saves last.pt and stops them."""
    args = train_args(nih_manifest) + (["--workers", "2"] if group else [])
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "chx", *args, "-o", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(train_losses(out)) >= 5:
            break
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    assert err.count("saved; continue with --resume") == 1, err[-2000:]   # once, by the main process
    step = load_checkpoint(out / "last.pt")["step"]
    assert 5 <= step < STEPS

    code, _, err = run_chx(capsys, *args, "--resume", "-o", out)
    assert code == 0, err
    cut = train_losses(out)
    assert list(cut) == list(range(1, STEPS + 1))
    assert all(uninterrupted[s] == cut[s] for s in uninterrupted), \
        [s for s in uninterrupted if uninterrupted[s] != cut[s]]
