"""train-joint: backbone + fusion fine-tuned end to end from images. The joint model sees the
store's maps, starts where the two-stage pair stands, resumes exactly, trains the backbone at its
own rate, and its checkpoint is served by export / predict / evaluate like the two-stage pair."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from chx.cli import main
from chx.data.demo import make_demo_data
from chx.data.manifest import read_manifest, write_manifest
from chx.data.study_dataset import StudyDataset
from chx.data.study_images import StudyImageDataset
from chx.data.transforms import Preprocess
from chx.engine.inference import feature_maps, predict_studies
from chx.engine.joint import predict_study_images
from chx.models import create_model, eval_weights, load_checkpoint, load_model, save_checkpoint
from chx.models.joint import JointModel
from chx.options import BackboneOptions, FusionOptions, JointOptions, TrainConfig
from chx.pipeline.train_joint import joint_model
from helpers import run_chx

CPU = dict(workers=0, device="cpu")


def tiny_joint(pool: int = 1, max_views: int = 3) -> JointModel:
    torch.manual_seed(0)
    image = create_model("backbone", backbone_name="test_convnext", num_classes=3, decoder_dim=16, heads=2,
                         ffn_dim=32)
    fusion = create_model("fusion", in_dim=image.feature_dim, num_classes=3, dim=16, max_views=max_views,
                          heads=2, ffn_dim=32)
    return create_model("joint", image=image, fusion=fusion, pool=pool)


def test_the_joint_model_sees_the_stores_maps_and_trains_the_backbone():
    model = tiny_joint(pool=2).eval()
    x = torch.randn(3, 1, 128, 128)
    maps = model.maps(x)
    assert torch.equal(maps, feature_maps(model.image, x, pool=2).float())    # pooled, float16 values
    maps.pow(2).sum().backward()
    grad = model.image.backbone.stem[0].weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    # the stage-1 head is carried for export, frozen
    assert not any(p.requires_grad for p in model.image.head.parameters())


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    x = torch.randn(3, 1, 64, 64)
    mask = torch.tensor([[True, True], [True, False]])
    types = torch.tensor([[0, 1], [0, 2]])

    def loss_and_grads(checkpointing: bool):
        model = tiny_joint().train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)                                    # the same dropout masks
        loss = model(x, mask, types).sigmoid().mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))


# ------------------------------------------------------------------ on the synthetic demo, 48 px

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """12 demo studies at 48 px, a tiny stage-1 model, its store (flipped maps) and a fusion model."""
    from chx.pipeline.extract import extract_features
    from chx.pipeline.train_backbone import train_backbone
    from chx.pipeline.train_fusion import train_fusion

    tmp = tmp_path_factory.mktemp("joint")
    manifest = make_demo_data(tmp / "demo", studies=12, size=48)
    images = tmp / "demo" / "images"
    train_backbone([manifest], [images], tmp / "b",
                   BackboneOptions(model="test_convnext", size=48, pretrained=False),
                   TrainConfig(epochs=1, max_steps=2, batch_size=4, **CPU))
    store = str(tmp / "f.zarr")
    extract_features(tmp / "b" / "best.pt", manifest, images, store, workers=0, flip=True, echo=lambda *a: None)
    train_fusion(store, tmp / "f", FusionOptions(dim=16, heads=2, ffn_dim=32),
                 TrainConfig(epochs=1, batch_size=2, **CPU))
    return {"tmp": tmp, "manifest": manifest, "images": images, "backbone": tmp / "b" / "best.pt",
            "store": store, "fusion": tmp / "f" / "best.pt"}


def test_views_are_chosen_as_the_fusion_stage_chooses_them(demo):
    df = read_manifest(demo["manifest"]).filter(pl.col("split") == "train")
    pre = Preprocess(size=48)
    for max_views in (1, 2):
        mine = StudyImageDataset(df, demo["images"], pre, max_views=max_views, train=True)
        store = StudyDataset(demo["store"], "train", max_views=max_views, train=True)
        where = {s: i for i, s in enumerate(store.study_ids)}
        for i, sid in enumerate(mine.study_ids):
            for seed in (3, 4, 5):
                got = mine[(i, seed)]
                assert got["images"].shape[0] == len(got["view_types"]) <= max_views
                assert got["view_types"].tolist() == store[(where[sid], seed)]["view_types"].tolist()


def test_the_joint_model_starts_at_the_two_stage_predictions(demo):
    """Initialised from the fusion checkpoint, the joint model predicts on images what the fusion
    model predicts from the store: same views and order, pooling, float16 maps and flip TTA."""
    s1, f = load_checkpoint(demo["backbone"]), load_checkpoint(demo["fusion"])
    model = joint_model(s1, demo["backbone"], f, demo["fusion"], JointOptions())
    df = read_manifest(demo["manifest"]).filter(pl.col("split") == "train")
    ds = StudyImageDataset(df, demo["images"], Preprocess.from_dict(s1["preprocess"]),
                           max_views=model.max_views)
    got = predict_study_images(model, ds, batch_size=3, workers=0)
    fusion = load_model(f, kind="fusion")
    store = StudyDataset(demo["store"], "train")
    want = predict_studies(fusion, store, StudyDataset(demo["store"], "train", use_flip=True), batch_size=3)
    order = [store.study_ids.index(s) for s in ds.study_ids]
    np.testing.assert_allclose(got, want[order], rtol=1e-5, atol=1e-6)


def joint_args(demo, *extra) -> list[str]:
    return ["train-joint", "--manifest", demo["manifest"], "--images", demo["images"], "--backbone",
            demo["backbone"], "--fusion", demo["fusion"], "--epochs", "2", "--batch-size", "2", "--lr", "1e-3",
            "--log-every", "1", "--val-every", "0.5", "--workers", "0", "--device", "cpu", *map(str, extra)]


@pytest.fixture(scope="module")
def joint_run(demo):
    """`chx train-joint` from the demo's stage-1 and fusion checkpoints, with gradient checkpointing."""
    out = demo["tmp"] / "joint"
    main([str(a) for a in joint_args(demo, "--grad-checkpointing", "-o", out)])
    return out


def train_losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_train_joint_resumes_exactly_and_trains_the_backbone_at_its_rate(capsys, demo, joint_run, tmp_path):
    # a run cut after 2 steps (at a validation), without gradient checkpointing, then resumed = the
    # uninterrupted run
    part = tmp_path / "part"
    assert run_chx(capsys, *joint_args(demo, "--max-steps", "2", "-o", part))[0] == 0
    code, out, err = run_chx(capsys, *joint_args(demo, "--resume", "-o", part))
    assert code == 0, err
    assert "val mAP" in out
    full = train_losses(joint_run)
    assert len(full) == 8 and train_losses(part) == full

    last = load_checkpoint(joint_run / "last.pt", kind="joint")
    assert [g["initial_lr"] for g in last["optimizer"]["param_groups"]] == [1e-3, 1e-3, 1e-4, 1e-4]
    s1 = eval_weights(load_checkpoint(demo["backbone"]))
    joint = last["state_dict"]
    assert not torch.equal(joint["image.backbone.stem.0.weight"], s1["backbone.stem.0.weight"])   # fine-tuned
    assert torch.equal(joint["image.head.group_weight"], s1["head.group_weight"])                 # frozen
    assert {r["kind"] for r in map(json.loads, (joint_run / "metrics.jsonl").read_text().splitlines())} == \
        {"train", "val"}
    assert json.loads((joint_run / "config.json").read_text())["kind"] == "joint"


def test_train_joint_with_device_augmentation_matches_the_workers_and_resumes_exactly(capsys, demo, tmp_path,
                                                                                      monkeypatch):
    """--augment-on device: the workers send each view un-augmented with its seed and BatchAugment
    augments the batch's views on the device. On the CPU the losses are those of --augment-on workers
    (the same augmentation, within interpolation tolerance), and a run cut after 2 steps and resumed
    has the losses of the uninterrupted run, exactly."""
    def train(out, *more):
        code, _, err = run_chx(capsys, *joint_args(demo, "--max-steps", "4", *more, "-o", tmp_path / out))
        assert code == 0, err
        return train_losses(tmp_path / out)

    from chx.data.batch_augment import BatchAugment

    calls = []
    forward = BatchAugment.forward
    monkeypatch.setattr(BatchAugment, "forward", lambda self, x, seeds: calls.append(len(seeds)) or forward(self, x, seeds))
    full = train("device", "--augment-on", "device")
    assert len(calls) == 4 and all(n >= 2 for n in calls)       # one batch of >= 2 views per step, on the device
    assert json.loads((tmp_path / "device" / "config.json").read_text())["options"]["augment_on"] == "device"
    assert run_chx(capsys, *joint_args(demo, "--augment-on", "device", "--max-steps", "2", "-o", tmp_path / "cut"))[0] == 0
    assert train("cut", "--augment-on", "device", "--resume") == full and len(full) == 4
    calls.clear()
    workers = train("workers", "--augment-on", "workers")
    assert not calls and len(workers) == len(full)
    assert all(abs(w - d) <= 1e-4 * abs(d) for w, d in zip(workers, full)), (workers, full)


def test_the_joint_checkpoint_exports_predicts_and_evaluates_as_it_validated(capsys, demo, joint_run, tmp_path):
    best = joint_run / "best.pt"
    ckpt = load_checkpoint(best, kind="joint")
    df = read_manifest(demo["manifest"])
    val = df.filter(pl.col("split") == "val")
    write_manifest(val, tmp_path / "val.parquet")
    # what validation computed for best.pt
    ds = StudyImageDataset(val, demo["images"], Preprocess.from_dict(ckpt["preprocess"]))
    want = dict(zip(ds.study_ids, predict_study_images(load_model(ckpt), ds, workers=0)))

    bundle = tmp_path / "model.chx"
    code, _, err = run_chx(capsys, "export", "--joint", best, "-o", bundle)
    assert code == 0, err
    inputs = ["--manifest", tmp_path / "val.parquet", "--images", demo["images"]]
    for source, name in ((["--bundle", bundle], "b.csv"), (["--joint", best], "j.csv")):
        code, _, err = run_chx(capsys, "predict", *source, *inputs, "-o", tmp_path / name)
        assert code == 0, err
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "j.csv").read_bytes()
    pred = pl.read_csv(tmp_path / "b.csv")
    assert sorted(pred["study_id"]) == sorted(want)
    for row in pred.iter_rows():
        np.testing.assert_allclose(row[1:], want[row[0]], rtol=1e-4, atol=1e-5)
    # a member of an ensemble exported as hf folders: the same probabilities
    assert run_chx(capsys, "ensemble", best, "-o", tmp_path / "ens")[0] == 0
    code, _, err = run_chx(capsys, "export", "--ensemble", tmp_path / "ens", "--format", "hf", "-o", tmp_path / "ens-hf")
    assert code == 0, err
    code, _, err = run_chx(capsys, "predict", "--bundle", tmp_path / "ens-hf", *inputs, "-o", tmp_path / "e.csv")
    assert code == 0, err
    np.testing.assert_allclose(pl.read_csv(tmp_path / "e.csv").drop("study_id").to_numpy(),
                               pred.drop("study_id").to_numpy(), rtol=0, atol=1e-6)

    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", best, "--manifest", demo["manifest"], "--images",
                           demo["images"], "--split", "val", "--workers", "0", "-o", tmp_path / "eval")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["unit"] == "studies" and metrics["mAP"] == pytest.approx(ckpt["metrics"]["mAP"], abs=1e-9)
    assert pl.read_csv(tmp_path / "eval" / "predictions.csv").columns[0] == "study_id"


def test_train_joint_refuses_a_fusion_model_that_does_not_belong(capsys, demo, tmp_path):
    other = load_checkpoint(demo["fusion"])
    other["store_fingerprint"] = {**other["store_fingerprint"], "checkpoint_sha256": "0" * 64}
    save_checkpoint(other, tmp_path / "other.pt")
    code, _, err = run_chx(capsys, *joint_args(demo, "-o", tmp_path / "a"), "--fusion", tmp_path / "other.pt")
    assert code == 2 and "another backbone" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_chx(capsys, *joint_args(demo, "--max-views", "2", "-o", tmp_path / "b"))
    assert code == 2 and "--max-views 4" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
