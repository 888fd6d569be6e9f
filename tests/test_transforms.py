"""Preprocessing config, train/eval transforms and the TTA flip."""

from __future__ import annotations

import pickle

import pytest
import torch

from chx.data.transforms import (Preprocess, RandomElastic, eval_transform,
                                 train_transform)
from chx.errors import ChxError

SIZE = 64


def _image(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, size)[:, None]
    return (0.6 * y * torch.ones(1, size) + 0.4 * torch.rand(size, size, generator=g))[None]


def test_preprocess_round_trip_and_validation():
    pre = Preprocess(size=128, mode="squash", mean=0.5, std=0.25)
    d = pre.to_dict()
    assert d == {"size": 128, "mode": "squash", "mean": 0.5, "std": 0.25}
    assert Preprocess.from_dict(d) == pre
    assert Preprocess.from_dict({"size": 32}) == Preprocess(32)
    assert Preprocess(32).mode == "letterbox"
    with pytest.raises(ChxError, match="unknown keys"):
        Preprocess.from_dict({**d, "channels": 3})
    with pytest.raises(ChxError, match="size"):
        Preprocess.from_dict({"mode": "letterbox"})
    for bad in ({"size": 0}, {"size": 64, "mode": "crop"}, {"size": 64, "std": 0.0},
                {"size": 1.5}, {"size": True}):
        with pytest.raises(ChxError):
            Preprocess(**bad)


def test_eval_is_deterministic_normalize():
    pre = Preprocess(SIZE)
    x = _image()
    t = eval_transform(pre)
    out = t(x)
    assert torch.equal(out, t(x))
    torch.testing.assert_close(out, (x - 0.449) / 0.226)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_train_same_seed_same_output_different_seed_differs():
    t = train_transform(Preprocess(SIZE))
    x = _image()
    torch.manual_seed(123)
    a = t(x)
    torch.manual_seed(123)
    b = t(x)
    torch.manual_seed(124)
    c = t(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_output_shape_dtype_range_no_nan():
    pre = Preprocess(SIZE)
    t = train_transform(pre)
    lo, hi = (0 - pre.mean) / pre.std, (1 - pre.mean) / pre.std
    torch.manual_seed(0)
    for i in range(60):  # enough draws to take every optional branch
        x = _image(i) if i % 3 else torch.zeros(1, SIZE, SIZE)  # constant input too
        y = t(x)
        assert y.shape == (1, SIZE, SIZE) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
        assert lo - 1e-5 <= y.min() and y.max() <= hi + 1e-5


def test_train_transform_pickles_for_dataloader_workers():
    t = pickle.loads(pickle.dumps(train_transform(Preprocess(SIZE))))
    x = _image()
    torch.manual_seed(5)
    a = t(x)
    torch.manual_seed(5)
    assert torch.equal(a, train_transform(Preprocess(SIZE))(x))


def test_random_elastic_is_smooth_and_identity_at_zero():
    x = _image(size=48)[:, :, :40]  # non-square
    torch.testing.assert_close(RandomElastic(0.0)(x), x, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    y = RandomElastic(0.02)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert 0 < (y - x).abs().mean() < 0.2
