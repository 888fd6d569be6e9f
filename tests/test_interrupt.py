"""SIGINT / SIGTERM during training: a resumable last.pt is written, the exit is clean, and
--resume continues with the same losses as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from chx.pipeline.checkpoint import load_checkpoint
from tests.conftest import ROOT, TINY, run_chx, shared_path


def train_losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_last_and_resume_matches_uninterrupted(capsys, tmp_path, nih_manifest, sig):
    images = shared_path("nih-64px", "images")
    args = ["train-backbone", "--manifest", str(nih_manifest), "--images", str(images), *TINY,
            "--batch-size", "8", "--max-steps", "40", "--log-every", "1", "--val-every", "10"]
    assert run_chx(capsys, *args, "-o", tmp_path / "full")[0] == 0

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "chx", *args, "-o", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(train_losses(out)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    step = load_checkpoint(out / "last.pt")["step"]
    assert 5 <= step < 40

    code, _, err = run_chx(capsys, *args, "--resume", "-o", out)
    assert code == 0, err
    full, cut = train_losses(tmp_path / "full"), train_losses(out)
    assert list(cut) == list(range(1, 41))
    assert all(full[s] == cut[s] for s in full), [s for s in full if full[s] != cut[s]]
