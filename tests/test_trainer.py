"""The shared trainer on a toy model: exact resume, per-step schedule, best-by-mAP, NaN handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from chx.data.samplers import ShuffleSampler
from chx.errors import ChxError
from chx.models import load_checkpoint
from chx.engine.trainer import fit, lr_lambda
from chx.options import TrainConfig


class Toy(Dataset):
    """Random features; 'augmentation' noise drawn from the per-item seed like the real datasets."""

    def __init__(self, n=64, poison=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, :2] > 0).float()
        self.poison = poison

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        i, seed = item
        noise = torch.randn(8, generator=torch.Generator().manual_seed(seed)) * 0.1
        x = self.x[i] + noise
        if self.poison is not None and i == self.poison:
            x = x * float("nan")
        return {"image": x, "target": self.y[i], "ids": f"img{i}"}


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def toy_loss(model, batch, device):
    return nn.functional.binary_cross_entropy_with_logits(model(batch["image"]), batch["target"])


META = {"kind": "backbone", "model_config": {"toy": 1}, "class_names": ["a", "b"]}


def run(out, cfg, data=None, evaluate=None, **kw):
    data = data or Toy()
    sampler = ShuffleSampler(len(data), seed=cfg.seed)
    return fit(toy_model(), data, sampler, toy_loss, evaluate, cfg, out, META, **kw)


def train_losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=1e-2, workers=0, log_every=1, val_every=0.5, ema=0.9)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_continues_exactly(tmp_path):
    full = run(tmp_path / "full", cfg())
    assert full.step == 24
    part = run(tmp_path / "part", cfg(max_steps=10))
    assert part.step == 10
    resumed = run(tmp_path / "part", cfg(), resume=True)
    assert resumed.step == 24
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert list(a) == list(range(1, 25)) and list(b) == list(range(1, 25))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    wa = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    wb = load_checkpoint(tmp_path / "part" / "last.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_mid_epoch_with_workers_and_grad_accum(tmp_path):
    c = dict(workers=2, grad_accum=2, batch_size=4)
    run(tmp_path / "full", cfg(**c))
    run(tmp_path / "part", cfg(max_steps=5, **c))
    run(tmp_path / "part", cfg(**c), resume=True)
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "part")


def test_lr_is_stepped_per_step_with_warmup_and_cosine(tmp_path):
    run(tmp_path / "r", cfg(warmup=0.25, epochs=4, min_lr_ratio=0.0))
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in lines if r["kind"] == "train"]
    assert len(set(lrs)) == len(lrs)  # changes every step, not per epoch
    f = lr_lambda(32, 8, 0.0)
    assert [round(f(s), 6) for s in (0, 7, 8, 20, 32)] == [round(1 / 9, 6), round(8 / 9, 6), 1.0, round(0.5 * (1 + math.cos(math.pi * 12 / 24)), 6), 0.0]
    peak = lrs.index(max(lrs))
    assert lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)


def test_best_checkpoint_is_chosen_by_val_map_not_loss(tmp_path):
    scores = iter([0.2, 0.5, 0.4, 0.3, 0.1, 0.0])
    result = run(tmp_path / "r", cfg(), evaluate=lambda m: {"mAP": next(scores), "mAUC": 0.5})
    assert result.best_metric == 0.5
    best = load_checkpoint(tmp_path / "r" / "best.pt")
    assert best["step"] == 8 and best["metrics"]["mAP"] == 0.5
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 24
    assert (tmp_path / "r" / "config.json").exists()


def test_nan_loss_stops_naming_the_step_and_images_and_keeps_last(tmp_path):
    out = tmp_path / "r"
    run(out, cfg(epochs=1, val_every=1.0))
    before = load_checkpoint(out / "last.pt")
    with pytest.raises(ChxError, match=r"loss is NaN/inf at step \d+ \(batch ids: .*img5"):
        run(out, cfg(epochs=2, val_every=1.0), data=Toy(poison=5), resume=True)
    after = load_checkpoint(out / "last.pt")
    assert after["step"] == before["step"]
    assert all(torch.isfinite(v).all() for v in after["state_dict"].values())


def test_nan_loss_can_skip_the_batch(tmp_path):
    result = run(tmp_path / "r", cfg(nonfinite="skip"), data=Toy(poison=5))
    assert result.step == 24
    weights = load_checkpoint(tmp_path / "r" / "last.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    skips = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
             if '"skip"' in x]
    assert len(skips) == 3 and all("img5" in s["ids"] for s in skips)


def test_resume_refuses_other_classes_and_existing_runs(tmp_path):
    run(tmp_path / "r", cfg(epochs=1))
    with pytest.raises(ChxError, match="already holds a run"):
        run(tmp_path / "r", cfg(epochs=1))
    data = Toy()
    with pytest.raises(ChxError, match="trained on other classes"):
        fit(toy_model(), data, ShuffleSampler(len(data)), toy_loss, None, cfg(epochs=2), tmp_path / "r",
            {**META, "class_names": ["a", "c"]}, resume=True)
    with pytest.raises(ChxError, match="does not exist"):
        run(tmp_path / "new", cfg(), resume=True)


@pytest.mark.parametrize("field, value", [("lr", -1.0), ("batch_size", 0), ("warmup", 1.5), ("ema", 1.0)])
def test_out_of_range_options_are_refused(tmp_path, field, value):
    with pytest.raises(ChxError, match="--" + field.replace("_", "-")):
        run(tmp_path / "r", cfg(**{field: value}))


@pytest.mark.parametrize("blank_is_train, split", [(True, "split 'train' or empty"), (False, "split 'train'")])
def test_an_empty_training_split_is_one_error_for_every_stage(blank_is_train, split):
    from chx.engine.trainer import require_training_split
    require_training_split(3, "studies", "store s", blank_is_train=blank_is_train)   # some: no error
    with pytest.raises(ChxError) as e:
        require_training_split(0, "studies", "store s", blank_is_train=blank_is_train, fix="extract again")
    assert str(e.value) == f"no training studies in store s ({split}); extract again"
    with pytest.raises(ChxError, match=r"no training rows in a\.csv .*chx prepare \.\.\. --val-fraction"):
        require_training_split(0, "rows", "a.csv")


@pytest.mark.parametrize("rank, shown", [(0, True), (1, False)])
def test_no_validation_is_one_warning_on_rank_0(capsys, rank, shown):
    from chx.engine.distributed import Distributed
    from chx.engine.trainer import warn_no_validation
    warn_no_validation("rows", Distributed(rank=rank, world_size=2))
    err = capsys.readouterr().err
    expected = "warning: no validation rows (split 'val'): best.pt will be the last checkpoint"
    assert (expected in err) == shown and err.count("warning") == int(shown)


def test_images_and_models_move_to_the_cpu_unchanged():
    from chx.engine.inference import images_to, model_to
    x = torch.randn(2, 1, 8, 8)
    y = images_to(x, torch.device("cpu"))
    assert y.is_contiguous() and torch.equal(x, y) and y.device.type == "cpu"
    model = nn.Conv2d(1, 2, 3)
    assert model_to(model, "cpu") is model and model.weight.is_contiguous()
