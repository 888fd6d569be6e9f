"""DDP: `torchrun --nproc_per_node 2 -m chx train-backbone ...` with gloo on 2 CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from chx.pipeline.checkpoint import load_checkpoint
from tests.conftest import ROOT, TINY, shared_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_train_backbone(tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "chx", "train-backbone", "--manifest", str(nih_manifest), "--images", str(images),
           *TINY, "--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--val-every", "1",
           "--device", "cpu", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    assert steps == [1, 2, 3]          # written once (rank 0 only), not once per process
    assert load_checkpoint(out / "last.pt")["step"] == 3
    assert not list(out.glob(".*.tmp"))


def test_torchrun_resume_continues_exactly(tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "chx", "train-backbone", "--manifest", str(nih_manifest), "--images", str(images),
               *TINY, "--batch-size", "4", "--log-every", "1", "--val-every", "1", "--device", "cpu",
               "-o", str(out), *extra]
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]

    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]

    torchrun(tmp_path / "full", "--max-steps", "6")
    torchrun(tmp_path / "cut", "--max-steps", "3")
    torchrun(tmp_path / "cut", "--max-steps", "6", "--resume")
    assert len(losses(tmp_path / "full")) == 6
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")   # each rank restored its own RNG
