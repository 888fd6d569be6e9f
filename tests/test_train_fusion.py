"""train-fusion from the store alone: no images, resume, ablations, deterministic views."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from chx.data.study_dataset import StudyDataset, collate_studies
from chx.data.views import deterministic_view_order
from chx.models.fusion import FusionModel
from chx.models import load_checkpoint
from chx.engine.inference import predict_studies
from helpers import run_chx, shared_path

FAST = ["--dim", "32", "--heads", "4", "--ffn-dim", "64", "--workers", "0", "--batch-size", "8",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def covid_store(tmp_path_factory, covid_backbone, covid_manifest):
    """A store extracted from a COPY of the images, which is then deleted."""
    tmp = tmp_path_factory.mktemp("fusion")
    images = tmp / "images"
    shutil.copytree(shared_path("covid-cxr", "images"), images)
    from chx.pipeline.extract import extract_features

    extract_features(covid_backbone, covid_manifest, images, str(tmp / "f.zarr"), workers=0,
                     echo=lambda *a: None)
    shutil.rmtree(images)  # stage 2b must not need them
    return tmp / "f.zarr"


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"train"' in x]


def test_train_fusion_reads_only_the_store(capsys, tmp_path, covid_store):
    out = tmp_path / "f"
    code, stdout, err = run_chx(capsys, "train-fusion", "--store", covid_store, *FAST, "--epochs", "2",
                                "--log-every", "1", "-o", out)
    assert code == 0, err
    assert "val mAP" in stdout
    ckpt = load_checkpoint(out / "best.pt", kind="fusion")
    assert ckpt["store_fingerprint"]["pool"] == 1
    model = FusionModel.from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])


def test_train_fusion_resume_is_exact(capsys, tmp_path, covid_store):
    args = ["train-fusion", "--store", covid_store, *FAST, "--epochs", "2", "--log-every", "1"]
    assert run_chx(capsys, *args, "-o", tmp_path / "full")[0] == 0
    assert run_chx(capsys, *args, "--max-steps", "7", "-o", tmp_path / "part")[0] == 0
    assert run_chx(capsys, *args, "--resume", "-o", tmp_path / "part")[0] == 0
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_ablation_switches_train(capsys, tmp_path, covid_store):
    code, _, err = run_chx(capsys, "train-fusion", "--store", covid_store, *FAST, "--max-steps", "2",
                           "--encoder-layers", "0", "--no-pos-enc", "--no-segment-embedding",
                           "--no-shuffle", "--max-views", "2", "--view-embedding", "-o", tmp_path / "a")
    assert code == 0, err
    cfg = load_checkpoint(tmp_path / "a" / "last.pt")["model_config"]
    assert cfg["layers"] == 0 and not cfg["pos_enc"] and not cfg["segment_embedding"] and cfg["max_views"] == 2
    code, _, err = run_chx(capsys, "train-fusion", "--store", covid_store, "--max-views", "0", "-o", tmp_path / "b")
    assert code == 2 and "--max-views" in err


def test_evaluation_views_are_deterministic(covid_store):
    assert deterministic_view_order(["LATERAL", "OTHER", "AP", "PA"], ["d", "c", "b", "a"]) == [3, 2, 0, 1]
    ds = StudyDataset(covid_store, "val", max_views=2)
    multi = [i for i in range(len(ds)) if len(ds[i]["view_types"]) > 1]
    assert multi, "covid val split should hold multi-view studies"
    a = ds[multi[0]]
    assert a["view_types"].tolist() == sorted(a["view_types"].tolist())  # frontal before lateral
    model = FusionModel(in_dim=a["features"].shape[1], num_classes=len(a["target"]), dim=32, heads=4,
                        ffn_dim=64).eval()
    p1 = predict_studies(model, ds, batch_size=5)
    p2 = predict_studies(model, ds, batch_size=3)
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-6)


def test_training_view_subset_is_random_but_seeded(covid_store):
    ds = StudyDataset(covid_store, "train", max_views=1, train=True)
    multi = next(i for i in range(len(ds)) if len(StudyDataset(covid_store, "train", max_views=4)[i]["view_types"]) > 1)
    picks = {tuple(ds[(multi, seed)]["view_types"].tolist()) for seed in range(20)}
    assert len(picks) > 1
    assert ds[(multi, 3)]["features"].equal(ds[(multi, 3)]["features"])
    batch = collate_studies([ds[(multi, 0)], ds[(multi, 1)]], pad_to=4)
    assert batch["view_mask"].sum(1).tolist() == [1, 1] and batch["features"].shape[1] == 4


def test_incomplete_store_is_refused(capsys, tmp_path, covid_backbone, covid_manifest):
    from chx.store import open_store

    with open_store(str(_make_partial(tmp_path))) as s:
        assert not s.complete
    code, _, err = run_chx(capsys, "train-fusion", "--store", tmp_path / "p.zarr", "-o", tmp_path / "r")
    assert code == 2 and "incomplete" in err and "extract-features" in err


def _make_partial(tmp_path):
    from chx.store import create_store

    s = create_store(tmp_path / "p.zarr", image_ids=["a", "b"], study_ids=["s", "s"], views=["PA", "LATERAL"],
                     splits=["train", "train"], labels=np.zeros((2, 1), np.float32), class_names=["x"],
                     feature_shape=(4, 2, 2), fingerprint={"m": 1}, shard_images=1)
    s.write_shard(0, np.zeros((1, 4, 2, 2), np.float16))      # image a done, image b not
    return tmp_path / "p.zarr"


def test_sigint_during_fusion_saves_last_and_resume_matches(capsys, tmp_path, covid_store):
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    args = ["train-fusion", "--store", str(covid_store), *FAST, "--epochs", "4", "--log-every", "1"]
    assert run_chx(capsys, *args, "-o", tmp_path / "full")[0] == 0
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "chx", *args, "-o", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert 0 < load_checkpoint(out / "last.pt")["step"] < len(losses(tmp_path / "full"))
    assert run_chx(capsys, *args, "--resume", "-o", out)[0] == 0
    assert losses(tmp_path / "full") == losses(out)


def _shard_reads(log: Path) -> dict[int, list[int]]:
    """{pid: [shards it read]} from the log of a run whose training reads were logged."""
    out: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        pid, shard = map(int, line.split())
        out.setdefault(pid, []).append(shard)
    return out


def test_streaming_workers_read_each_shard_once_and_resume_keeps_the_order(tmp_path, monkeypatch):
    """--preload off with 2 DataLoader workers: each shard's batches go to one worker (the sampler's
    lanes), so an epoch reads every shard once in all, where the plain shard-local order made each
    worker read every shard of its buffers (2x the reads). The lanes are part of the study order: a
    run resumed with other --workers keeps its own and gives the same losses."""
    from chx.data.study_dataset import StudyDataset
    from chx.options import FusionOptions, TrainConfig
    from chx.pipeline.train_fusion import train_fusion
    from test_study_dataset import make_store

    store = make_store(str(tmp_path / "s.zarr"), n_studies=160, flip=False, shard_images=16)
    log = tmp_path / "reads.log"
    read = StudyDataset._read_shard

    def logged(self, k):
        if self.train:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {k}\n")
        return read(self, k)

    monkeypatch.setattr(StudyDataset, "_read_shard", logged)
    opts = FusionOptions(dim=16, heads=2, ffn_dim=32, preload="off", buffer_shards=2)

    def cfg(workers, **kw):
        return TrainConfig(epochs=2, batch_size=4, workers=workers, device="cpu", log_every=1, val_every=1.0, **kw)

    train_fusion(store, tmp_path / "full", opts, cfg(2))
    reads = _shard_reads(log)
    n_shards = len(set(StudyDataset(store, "train").item_shards.tolist()))
    assert len(reads) == 4                                       # two workers in each of 2 epochs
    per_worker = [len(set(r)) for r in reads.values()]
    total = sum(len(r) for r in reads.values())
    # each epoch reads every shard once, bar a few where the streams' last batches mix (the plain
    # order: each worker ~every shard, so about 2 * n_shards per epoch)
    assert total <= 2 * (n_shards + 4) and max(per_worker) < 0.75 * n_shards, (total, n_shards, reads)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["reader"]["lanes"] == 2
    # resumed with another worker count: the run's lanes, the same losses
    train_fusion(store, tmp_path / "part", opts, cfg(2, max_steps=9))
    train_fusion(store, tmp_path / "part", opts, cfg(0), resume=True)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
