"""Stage-1 augmentations CLAHE (`--clahe`) and coarse dropout (`--coarse-dropout`): their effect,
their determinism under the seed, and that the default augmentation does not include them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chx.data.images import load_image
from chx.data.transforms import CoarseDropout, Preprocess, RandomCLAHE, clahe, train_transform
from chx.errors import ChxError
from helpers import TINY, run_chx, shared_path


def _covid_image(size=256):
    path = sorted(shared_path("covid-cxr", "images").glob("*.png"))[0]
    return load_image(path, size, "squash")          # [1, S, S] in [0, 1]


def _local_contrast(x: torch.Tensor, k: int = 16) -> float:
    """Mean over k x k windows of the standard deviation inside the window."""
    m = F.avg_pool2d(x[None], k, k)
    m2 = F.avg_pool2d(x[None] ** 2, k, k)
    return float((m2 - m * m).clamp(min=0).sqrt().mean())


@pytest.mark.parametrize("clip", [2.0, 4.0])
def test_clahe_raises_local_contrast_of_a_real_image(clip):
    x = _covid_image()
    y = clahe(x, clip_limit=clip)
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= float(y.min()) and float(y.max()) <= 1
    assert _local_contrast(y) > 1.2 * _local_contrast(x)
    # a higher clip limit equalises more
    assert _local_contrast(clahe(x, clip_limit=4.0)) > _local_contrast(clahe(x, clip_limit=1.5))


def test_clahe_with_one_tile_and_no_clipping_is_histogram_equalisation():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 33, 47, generator=g) ** 3)            # skewed histogram, odd sizes
    y = clahe(x, clip_limit=1e6, tiles=1)
    levels = (x * 255).round().long().flatten().numpy()
    cdf = np.cumsum(np.bincount(levels, minlength=256)) / levels.size
    np.testing.assert_allclose(y.flatten().numpy(), cdf[levels], rtol=0, atol=1e-6)


def test_clahe_is_monotone_within_a_tile_and_handles_flat_and_small_images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 64, 64, generator=g)
    y = clahe(x, clip_limit=2.0, tiles=1)
    order = torch.argsort(x.flatten())
    assert (torch.diff(y.flatten()[order]) >= -1e-6).all()
    flat = torch.full((1, 20, 20), 0.5)
    assert torch.isfinite(clahe(flat)).all() and float(clahe(flat).std()) < 1e-6
    assert clahe(torch.rand(1, 5, 3, generator=g)).shape == (1, 5, 3)   # smaller than the tile grid


@pytest.mark.parametrize("size,shape,hole", [(0.25, (40, 40), (10, 10)), (0.1, (40, 60), (4, 6)),
                                             (0.01, (30, 30), (1, 1))])
def test_coarse_dropout_zeroes_holes_of_the_given_size(size, shape, hole):
    torch.manual_seed(0)
    x = torch.ones(1, *shape)
    y = CoarseDropout(size, holes=(1, 1))(x)
    zeros = (y[0] == 0).nonzero()
    assert len(zeros) == hole[0] * hole[1]
    (r0, c0), (r1, c1) = zeros.min(0).values.tolist(), zeros.max(0).values.tolist()
    assert (r1 - r0 + 1, c1 - c0 + 1) == hole
    assert (x == 1).all()                               # the input is not modified in place
    for _ in range(20):                                 # 1-8 holes, always inside the image
        n_zero = int((CoarseDropout(size)(x) == 0).sum())
        assert hole[0] * hole[1] <= n_zero <= 8 * hole[0] * hole[1]


def test_coarse_dropout_size_out_of_range_is_one_line():
    for size in (0.0, 0.6, -0.1):
        with pytest.raises(ChxError, match="--coarse-dropout"):
            CoarseDropout(size)


def test_augmentations_are_deterministic_under_the_seed():
    x = _covid_image(64)
    t = train_transform(Preprocess(64), clahe=True, coarse_dropout=0.1)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(torch.stack([t(x) for _ in range(6)]))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    torch.manual_seed(0)
    a = RandomCLAHE()(x)
    torch.manual_seed(0)
    assert torch.equal(a, RandomCLAHE()(x))


def test_the_dataset_seeds_each_item_with_the_augmentations(covid_manifest):
    from chx.data.datasets import ImageDataset
    from chx.data.manifest import read_manifest

    df = read_manifest(covid_manifest).head(3)
    images = shared_path("covid-cxr", "images")
    ds = ImageDataset(df, images, Preprocess(64), train=True, augment=dict(clahe=True, coarse_dropout=0.2))
    plain = ImageDataset(df, images, Preprocess(64), train=True)
    # p 0.5 each: over a few seeds some item differs from the plain augmentation, and each is reproducible
    differs = False
    for seed in range(6):
        a, b = ds[(1, seed)]["image"], ds[(1, seed)]["image"]
        assert torch.equal(a, b)
        differs |= not torch.equal(a, plain[(1, seed)]["image"])
    assert differs


def test_default_augmentation_has_neither():
    names = [type(m).__name__ for m in train_transform(Preprocess(64)).transforms]
    inner = [type(t).__name__ for m in train_transform(Preprocess(64)).transforms
             for t in getattr(m, "transforms", [])]
    assert not {"RandomCLAHE", "CoarseDropout"} & set(names + inner)


def test_cli_refuses_a_coarse_dropout_out_of_range(capsys, tmp_path, covid_manifest):
    code, _, err = run_chx(capsys, "train-backbone", "--manifest", covid_manifest, "--images",
                           shared_path("covid-cxr", "images"), *TINY, "--coarse-dropout", "0.8",
                           "-o", tmp_path / "r")
    assert code == 2 and "--coarse-dropout" in err and not (tmp_path / "r").exists()
