"""extract-features: exact round trip, kill -9 + rerun, parallel shards, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import torch

from chx.data.images import load_image
from chx.data.manifest import read_manifest, write_manifest
from chx.data.transforms import Preprocess, eval_transform
from chx.engine.inference import load_backbone
from chx.store import open_store
from helpers import ROOT, run_chx, shared_path


def extract(capsys, ckpt, manifest, store, *extra):
    return run_chx(capsys, "extract-features", "--checkpoint", ckpt, "--manifest", manifest,
                   "--images", shared_path("covid-cxr", "images"), "--store", store,
                   "--workers", "0", "--batch-size", "8", "--shard-images", "8", *extra)


def features_of(store_path) -> dict[str, np.ndarray]:
    with open_store(store_path) as s:
        return {i: s.read_image(r) for r, i in enumerate(s.image_ids)}


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_extracted_maps_equal_the_backbone_output(capsys, tmp_path, covid_backbone, covid_manifest, suffix):
    store = tmp_path / f"f.{suffix}"
    code, out, err = extract(capsys, covid_backbone, covid_manifest, store, "--flip")
    assert code == 0, err
    assert "projected" in out and "is complete" in out
    model, ckpt = load_backbone(covid_backbone)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    df = read_manifest(covid_manifest)
    with open_store(store) as s:
        assert s.complete and s.n_images == df.height and s.has_flip
        for row in (0, 57, s.n_images - 1):
            image_id = s.image_ids[row]
            path = df.filter(pl.col("image_id") == image_id)["path"][0]
            x = eval_transform(pre)(load_image(shared_path("covid-cxr", "images", path), pre.size, pre.mode))
            with torch.no_grad():
                want = model.forward_features(x[None])[0].numpy()
                want_flip = model.forward_features(torch.flip(x[None], dims=[-1]))[0].numpy()
            np.testing.assert_allclose(s.read_image(row).astype(np.float32), want, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(s.read_image(row, flip=True).astype(np.float32), want_flip,
                                       rtol=2e-3, atol=2e-3)


def test_precision_is_recorded_in_the_store_and_repeated_by_predict(capsys, tmp_path, covid_backbone,
                                                                    covid_manifest, covid_models, monkeypatch):
    """--precision: on a GPU the backbone's forward runs under bf16 autocast (fp32 extraction ran at 0.26x
    of the bare bf16 forward on an H200: benchmarks/results/gpu-bench-2026-12-04.json). The store records
    it, a bundle of a fusion model trained on that store carries it, and predict repeats it on a GPU. On
    the CPU (auto) nothing changes: float32, no key, as in stores made before the option existed."""
    import chx.pipeline.extract as ex
    from chx.engine.inference import amp_of
    from chx.engine.predictor import Predictor, make_bundle
    from chx.models import load_checkpoint, save_checkpoint

    plain, mixed = tmp_path / "plain.zarr", tmp_path / "mixed.zarr"
    assert extract(capsys, covid_backbone, covid_manifest, plain)[0] == 0
    monkeypatch.setattr(ex, "autocast_dtype", lambda precision, device: torch.bfloat16)   # a GPU's choice
    assert extract(capsys, covid_backbone, covid_manifest, mixed)[0] == 0
    with open_store(plain) as a, open_store(mixed) as b:
        assert "precision" not in a.fingerprint and b.fingerprint["precision"] == "bfloat16"
    a, b = features_of(plain), features_of(mixed)
    diff = max(float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max()) for k in a)
    scale = max(float(np.abs(a[k].astype(np.float32)).max()) for k in a)
    assert 0 < diff < 0.1 * scale      # bf16 arithmetic: other maps, close ones
    monkeypatch.undo()
    # a refill of the float32 store under bf16 is refused by its fingerprint (no mixed stores)
    monkeypatch.setattr(ex, "autocast_dtype", lambda precision, device: torch.bfloat16)
    code, _, err = extract(capsys, covid_backbone, covid_manifest, plain)
    assert code != 0 and "--precision fp32" in err, err     # names the option that continues the store
    monkeypatch.undo()

    ckpt = load_checkpoint(covid_models["fusion"])
    ckpt["store_fingerprint"] = {**ckpt["store_fingerprint"], "precision": "bfloat16"}
    save_checkpoint(ckpt, tmp_path / "fusion.pt")
    bundle = make_bundle(covid_backbone, tmp_path / "fusion.pt")
    assert bundle["features"]["precision"] == "bfloat16"
    assert "precision" not in make_bundle(covid_backbone, covid_models["fusion"])["features"]
    assert Predictor.load(backbone=covid_backbone, fusion=tmp_path / "fusion.pt", device="cpu").amp is None
    import chx.engine.predictor as pr
    asked = []
    monkeypatch.setattr(pr, "amp_of", lambda name, device: asked.append(name) or torch.bfloat16)   # as on a GPU
    assert Predictor.load(backbone=covid_backbone, fusion=tmp_path / "fusion.pt", device="cpu").amp is torch.bfloat16
    assert asked == ["bfloat16"]
    # on a GPU: bf16, or fp16 where it has no bf16 (this machine's torch has no GPU to ask)
    assert amp_of("bfloat16", torch.device("cuda")) in (torch.bfloat16, torch.float16)
    assert amp_of(None, torch.device("cuda")) is None and amp_of("bfloat16", torch.device("cpu")) is None


def test_kill_9_mid_extraction_then_rerun_equals_uninterrupted(capsys, tmp_path, covid_backbone, covid_manifest,
                                                              covid_reference_store):
    store = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "chx", "extract-features", "--checkpoint", str(covid_backbone),
           "--manifest", str(covid_manifest), "--images", str(shared_path("covid-cxr", "images")),
           "--store", str(store), "--workers", "0", "--batch-size", "4", "--shard-images", "8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with open_store(store) as s:
                done = int(s.done.sum())
        except Exception:
            continue
        if done >= 40:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open_store(store) as s:
        assert not s.complete and 0 < int(s.done.sum()) < s.n_images
    code, out, err = extract(capsys, covid_backbone, covid_manifest, store)
    assert code == 0, err
    assert "is complete" in out
    ref, got = features_of(covid_reference_store), features_of(store)
    assert ref.keys() == got.keys()
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_two_shard_processes_at_once_fill_one_store(capsys, tmp_path, covid_backbone, covid_manifest,
                                                    covid_reference_store):
    store = tmp_path / "sharded.zarr"
    procs = [subprocess.Popen([sys.executable, "-m", "chx", "extract-features", "--checkpoint",
                               str(covid_backbone), "--manifest", str(covid_manifest), "--images",
                               str(shared_path("covid-cxr", "images")), "--store", str(store),
                               "--workers", "0", "--shard", f"{i}/2", "--shard-images", "8"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    with open_store(store) as s:
        assert s.complete
    ref, got = features_of(covid_reference_store), features_of(store)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_store_from_another_fingerprint_is_refused(capsys, tmp_path, covid_backbone, covid_manifest):
    store = tmp_path / "f.zarr"
    assert extract(capsys, covid_backbone, covid_manifest, store)[0] == 0
    code, _, err = extract(capsys, covid_backbone, covid_manifest, store, "--pool", "2")
    assert code == 2 and "pool" in err and "--overwrite" in err
    code, _, err = extract(capsys, covid_backbone, covid_manifest, store, "--pool", "2", "--overwrite")
    assert code == 0, err


def test_hdf5_refuses_shards_and_missing_image_is_named(capsys, tmp_path, covid_backbone, covid_manifest):
    code, _, err = extract(capsys, covid_backbone, covid_manifest, tmp_path / "f.h5", "--shard", "0/2")
    assert code == 2 and "Zarr" in err
    df = read_manifest(covid_manifest)
    broken = df.with_columns(pl.when(pl.col("image_id") == df["image_id"][3]).then(pl.lit("nope.png"))
                             .otherwise(pl.col("path")).alias("path"))
    write_manifest(broken, tmp_path / "broken.parquet")
    code, _, err = extract(capsys, covid_backbone, tmp_path / "broken.parquet", tmp_path / "g.zarr")
    assert code == 2 and "nope.png" in err
    code, _, err = extract(capsys, covid_backbone, covid_manifest, tmp_path / "x.zarr", "--shard", "3/2")
    assert code == 2 and "--shard" in err


def test_store_info_prints_the_figures(capsys, tmp_path, covid_backbone, covid_manifest):
    store = tmp_path / "f.zarr"
    assert extract(capsys, covid_backbone, covid_manifest, store)[0] == 0
    code, out, err = run_chx(capsys, "store", "info", store)
    assert code == 0, err
    assert "images             391" in out and "complete           True" in out
    assert "sharded: 8 images per shard object" in out and "size on disk (du)" in out
    assert "compression ratio" in out and "checkpoint_sha256=" in out


def test_repair_re_extracts_only_damaged_shards(capsys, tmp_path, covid_backbone, covid_manifest,
                                                covid_reference_store):
    store = tmp_path / "f.zarr"
    assert extract(capsys, covid_backbone, covid_manifest, store)[0] == 0
    victim = store / "features" / "c.3.0.0.0"                         # shard 3's object
    victim.write_bytes(victim.read_bytes()[:100])                     # a truncated shard object
    code, out, err = run_chx(capsys, "store", "verify", store)
    assert code == 2 and "1 damaged shard(s)" in out, out + err
    code, out, err = run_chx(capsys, "train-fusion", "--store", store, "-o", tmp_path / "f")
    assert code == 2 and "--repair" in err and "Traceback" not in err
    code, out, err = extract(capsys, covid_backbone, covid_manifest, store, "--repair")
    assert code == 0, err
    assert "repair: 1 damaged shard(s)" in out and "wrote 8 images" in out
    assert run_chx(capsys, "store", "verify", store)[0] == 0
    ref, got = features_of(covid_reference_store), features_of(store)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
