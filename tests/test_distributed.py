"""DDP: `torchrun --nproc_per_node 2 -m chx train-backbone ...` with gloo on 2 CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from chx.models import load_checkpoint
from helpers import ROOT, TINY, shared_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_train_and_resume_exactly(tmp_path, nih_manifest):
    """One torchrun test: 2 gloo processes train (metrics written once, by rank 0), and a run cut
    at step 3 then resumed equals the uninterrupted 6 steps (each rank restored its own RNG). The
    cut run reads an image cache (`chx cache-images`) instead of the files: the same losses, so DDP
    and exact resume behave alike with both inputs."""
    from chx.options import CacheImagesOptions
    from chx.pipeline.cache_images import cache_images

    images = shared_path("nih-64px", "images")
    cache = tmp_path / "nih-64.zarr"
    cache_images(CacheImagesOptions(manifest=nih_manifest, out=str(cache), size=64, workers=0), images,
                 echo=lambda *a: None)

    def torchrun(out, *extra, source=("--images", str(images))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "chx", "train-backbone", "--manifest", str(nih_manifest), *source,
               *TINY, "--batch-size", "4", "--log-every", "1", "--val-every", "1", "--device", "cpu",
               "-o", str(out), *extra]
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]

    def train_records(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]

    full = tmp_path / "full"
    torchrun(full, "--max-steps", "6")
    assert json.loads((full / "config.json").read_text())["world_size"] == 2
    assert [r["step"] for r in train_records(full)] == [1, 2, 3, 4, 5, 6]   # once, not once per process
    assert load_checkpoint(full / "last.pt")["step"] == 6
    assert not list(full.glob(".*.tmp"))

    from_cache = ("--images-cache", str(cache))
    torchrun(tmp_path / "cut", "--max-steps", "3", source=from_cache)
    torchrun(tmp_path / "cut", "--max-steps", "6", "--resume", source=from_cache)
    assert [r["loss"] for r in train_records(full)] == [r["loss"] for r in train_records(tmp_path / "cut")]
