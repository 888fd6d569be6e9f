"""Injected faults lose nothing and explain themselves: kill -9 during training, a shard worker
killed mid-shard, a full disk while writing a checkpoint or the store."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time

import numpy as np

from chx.models import load_checkpoint
from chx.store import open_store
from helpers import ROOT, TINY, run_chx, shared_path


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return True
        except Exception:
            pass
        time.sleep(0.05)
    return False


def train_steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_kill_9_during_training_keeps_checkpoints_and_resumes(capsys, tmp_path, nih_manifest):
    images = shared_path("nih-64px", "images")
    out = tmp_path / "run"
    args = ["train-backbone", "--manifest", str(nih_manifest), "--images", str(images), *TINY,
            "--batch-size", "8", "--max-steps", "24", "--log-every", "1", "--val-every", "0.04"]
    proc = subprocess.Popen([sys.executable, "-m", "chx", *args, "-o", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: (out / "best.pt").exists() and len(train_steps(out)) >= 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert 0 < last["step"] < 24 and best["step"] <= last["step"]
    code, _, err = run_chx(capsys, *args, "--resume", "-o", out)
    assert code == 0, err
    assert load_checkpoint(out / "last.pt")["step"] == 24


def test_shard_worker_killed_mid_shard_then_rerun_of_that_shard(capsys, tmp_path, covid_backbone, covid_manifest,
                                                                 covid_reference_store):
    images = shared_path("covid-cxr", "images")
    common = ["--checkpoint", covid_backbone, "--manifest", covid_manifest, "--images", images,
              "--workers", "0", "--batch-size", "4", "--shard-images", "8"]
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "chx", "extract-features", *map(str, common),
                             "--store", str(store), "--shard", "0/2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def some_done():
        with open_store(store) as s:
            return 20 <= int(s.done.sum())
    assert wait_for(some_done)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, out, err = run_chx(capsys, "extract-features", *common, "--store", store, "--shard", "1/2")
    assert code == 0, err
    assert "still to do" in out                       # shard 0 is unfinished: not complete
    with open_store(store) as s:
        assert not s.complete
        owner = s.shard_of_row(np.arange(s.n_images)) % 2        # writer i owns shards s % 2 == i
        assert s.done[owner == 1].all() and not s.done[owner == 0].all()
    code, out, err = run_chx(capsys, "extract-features", *common, "--store", store, "--shard", "0/2")
    assert code == 0 and "is complete" in out, err
    with open_store(covid_reference_store) as ref, open_store(store) as got:
        assert got.complete
        by_id = dict(zip(got.image_ids, range(got.n_images)))
        for r, image_id in enumerate(ref.image_ids):
            assert np.array_equal(ref.read_image(r), got.read_image(by_id[image_id]))


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(capsys, tmp_path, nih_manifest, monkeypatch):
    images = shared_path("nih-64px", "images")
    out = tmp_path / "run"
    args = ["train-backbone", "--manifest", nih_manifest, "--images", images, *TINY, "--batch-size", "8"]
    assert run_chx(capsys, *args, "--max-steps", "2", "-o", out)[0] == 0
    before = load_checkpoint(out / "last.pt")

    import chx.models.checkpoint as ck

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck.torch, "save", full_disk)
    code, _, err = run_chx(capsys, *args, "--max-steps", "4", "--resume", "-o", out)
    assert code == 2 and "No space left on device" in err and "intact" in err
    monkeypatch.undo()
    after = load_checkpoint(out / "last.pt")
    assert after["step"] == before["step"] == 2
    assert not list(out.glob(".*.tmp"))                # the partial temp file was removed
    code, _, err = run_chx(capsys, *args, "--max-steps", "4", "--resume", "-o", out)
    assert code == 0, err
    assert load_checkpoint(out / "last.pt")["step"] == 4


def test_disk_full_while_extracting_then_rerun_completes(capsys, tmp_path, covid_backbone, covid_manifest,
                                                         covid_reference_store, monkeypatch):
    images = shared_path("covid-cxr", "images")
    common = ["--checkpoint", covid_backbone, "--manifest", covid_manifest, "--images", images,
              "--workers", "0", "--batch-size", "8", "--shard-images", "8"]

    from chx.store._base import FeatureStore
    real_write, calls = FeatureStore.write_shard, []

    def write_until_full(self, *a, **kw):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *a, **kw)
    monkeypatch.setattr(FeatureStore, "write_shard", write_until_full)
    store = tmp_path / "s.zarr"
    code, _, err = run_chx(capsys, "extract-features", *common, "--store", store)
    assert code == 2 and "No space left on device" in err and "rerun" in err
    assert len([x for x in err.splitlines() if x.strip()]) == 1
    monkeypatch.undo()
    with open_store(store) as s:
        assert not s.complete and int(s.done.sum()) == 40
    code, out, err = run_chx(capsys, "extract-features", *common, "--store", store)
    assert code == 0 and "wrote 351 images" in out, err
    with open_store(covid_reference_store) as ref, open_store(store) as got:
        assert all(np.array_equal(ref.read_image(r), got.read_image(r)) for r in range(ref.n_images))
