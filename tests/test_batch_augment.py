"""The stage-1 augmentation batched on the device (chx.data.batch_augment, `--augment-on device`):
the same draws per image as the per-image transform, the same outputs, determinism, and training
with it (a few steps of convnext_atto, exact resume)."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.transforms import v2

from chx.data.batch_augment import BatchAugment, augment_on_device
from chx.data.images import load_image
from chx.data.transforms import Clamp, Normalize, Preprocess, apply_augment, draw_augment, train_transform
from chx.options import AUGMENT_ON, BackboneOptions
from helpers import nih_subset, run_chx, shared_path

S = 64
PRE = Preprocess(S)
OPTIONS = [dict(), dict(clahe=True, coarse_dropout=0.1)]
# Per-image and batched outputs differ by float32 rounding only: the batched crop samples through
# normalised grid coordinates (error ~S x 2^-24 px), the blur is one grouped convolution and the
# brightness/contrast factors are float32 tensors (a last-bit difference). Measured: <= 4e-7 at 64
# and 512 px; 1e-5 of the [0, 1] range leaves room for other CPUs' summation orders while any wrong
# geometry, order or factor (differences of 1e-2 and more) fails.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """8 real X-rays [8, 1, S, S] in [0, 1] (covid-cxr, letterboxed as training loads them)."""
    paths = sorted(shared_path("covid-cxr", "images").glob("*.png"))[:8]
    return torch.stack([load_image(p, S, "letterbox") for p in paths])


def per_image(x: torch.Tensor, seeds, **opts) -> torch.Tensor:
    """What ImageDataset's workers make of each image: train_transform after manual_seed(seed)."""
    t = train_transform(PRE, **opts)
    out = []
    for xi, seed in zip(x, seeds):
        torch.manual_seed(seed)
        out.append(t(xi))
    return torch.stack(out)


def _same(a, b) -> bool:
    fields = a.__dataclass_fields__
    return all(torch.equal(getattr(a, f), getattr(b, f)) if isinstance(getattr(a, f), torch.Tensor)
               else getattr(a, f) == getattr(b, f) for f in fields)


@pytest.mark.parametrize("opts", OPTIONS, ids=["default", "clahe+dropout"])
def test_batched_draws_are_the_per_image_draws(images, opts):
    """(a) One function draws for both: the batched version's draws for seed s are those the
    per-image transform takes after torch.manual_seed(s) (its output is apply_augment of them)."""
    seeds = list(range(100, 140))
    batched = BatchAugment(PRE, **opts).draws(seeds)
    t = train_transform(PRE, **opts)
    for seed, d in zip(seeds, batched):
        torch.manual_seed(seed)
        assert _same(draw_augment(S, **opts), d)
        torch.manual_seed(seed)
        out = t(images[0])
        assert torch.equal(out, Normalize(PRE.mean, PRE.std)(Clamp()(apply_augment(images[0], d))))
    assert not _same(batched[0], batched[1])


def test_draws_follow_the_documented_probabilities():
    draws = [draw_augment(S, clahe=True, coarse_dropout=0.1, generator=torch.Generator().manual_seed(s))
             for s in range(1000)]

    def rate(pred):
        return sum(map(pred, draws)) / len(draws)

    # binomial(1000, p): 4 standard deviations are at most 0.064
    for p, pred in [(0.5, lambda d: d.clahe is not None), (0.5, lambda d: d.flip),
                    (0.5, lambda d: d.affine is not None), (0.2, lambda d: d.elastic is not None),
                    (0.5, lambda d: d.jitter is not None), (0.1, lambda d: d.noise is not None),
                    (0.1, lambda d: d.blur is not None), (0.5, lambda d: d.holes is not None)]:
        assert abs(rate(pred) - p) < 0.064
    jit = [d.jitter for d in draws if d.jitter]
    assert 0.4 < sum(j[0] for j in jit) / len(jit) < 0.6 and all(0.8 <= j[1] <= 1.2 and 0.8 <= j[2] <= 1.2
                                                                   for j in jit)
    assert all(1 <= d.clahe <= 4 for d in draws if d.clahe is not None)
    assert all(-10 <= d.affine[0] <= 10 and 0.9 <= d.affine[2] <= 1.1 and max(map(abs, d.affine[1])) <= 4
               for d in draws if d.affine)
    assert all(1 <= len(d.holes[1]) <= 8 and d.holes[0] == (6, 6) for d in draws if d.holes)
    assert all(0.9 * S * S - 2 * S <= d.crop[2] * d.crop[3] <= S * S for d in draws)
    plain = draw_augment(S, generator=torch.Generator().manual_seed(0))
    assert plain.clahe is None and plain.holes is None


def test_per_image_transform_equals_the_torchvision_pipeline_it_replaced(images):
    """The draws are torchvision's (same calls, same order): the per-image transform equals the v2
    Compose chx used before, bit for bit, except for the noise field (now made from a drawn seed)."""
    bilinear = v2.InterpolationMode.BILINEAR
    from chx.data.transforms import RandomElastic
    reference = v2.Compose([
        v2.RandomResizedCrop(S, scale=(0.9, 1.0), ratio=(0.9, 1.1), interpolation=bilinear, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1),
                                        interpolation=bilinear, fill=0)], p=0.5),
        v2.RandomApply([RandomElastic(magnitude=0.02, grid=5)], p=0.2),
        v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
        v2.RandomApply([v2.RandomChoice([v2.GaussianNoise(mean=0.0, sigma=0.02, clip=True),
                                         v2.GaussianBlur(kernel_size=7, sigma=(0.1, 1.5))])], p=0.2),
        Clamp(0.0, 1.0), Normalize(PRE.mean, PRE.std)])
    t = train_transform(PRE)
    compared = 0
    for seed in range(60):
        torch.manual_seed(seed)
        if draw_augment(S).noise is not None:
            continue
        torch.manual_seed(seed)
        a = reference(images[seed % 8])
        torch.manual_seed(seed)
        assert torch.equal(a, t(images[seed % 8])), seed
        compared += 1
    assert compared > 50


@pytest.mark.parametrize("opts", OPTIONS, ids=["default", "clahe+dropout"])
def test_batched_outputs_match_the_per_image_outputs(images, opts):
    """(b) Every step taken somewhere in these batches; the largest difference within TOLERANCE."""
    aug = BatchAugment(PRE, **opts)
    worst, taken = 0.0, set()
    for batch in range(12):
        seeds = [batch * 100 + i for i in range(8)]
        out = aug(images, seeds)
        worst = max(worst, float((out - per_image(images, seeds, **opts)).abs().max()) * PRE.std)
        for d in aug.draws(seeds):
            taken |= {k for k in ("clahe", "affine", "elastic", "jitter", "noise", "blur", "holes")
                      if getattr(d, k) is not None} | ({"flip"} if d.flip else set())
            taken |= {"contrast first"} if d.jitter and not d.jitter[0] else set()
    expected = {"flip", "affine", "elastic", "jitter", "contrast first", "noise", "blur"}
    assert taken >= expected | ({"clahe", "holes"} if opts else set())
    assert worst <= TOLERANCE


def test_batched_is_deterministic_under_the_seeds_and_independent_of_the_batch(images):
    """(c) The seeds alone decide: the same seeds give the same batch, other seeds another, and an
    image's output does not depend on the others in its batch."""
    aug = BatchAugment(PRE, clahe=True, coarse_dropout=0.1)
    seeds = torch.arange(8) * 7919 + 2 ** 40           # a tensor, as the DataLoader collates them
    a = aug(images, seeds)
    assert torch.equal(a, aug(images, seeds))
    assert not torch.equal(a, aug(images, seeds + 1))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aug(images[perm], seeds[perm]), a[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(aug(images[:3], seeds[:3]), a[:3], atol=1e-6, rtol=0)


def test_a_batch_of_8_at_64px_keeps_shape_dtype_and_range(images):
    """(d) On CPU: shape, dtype, finite values in the normalised [0, 1] range; input untouched."""
    before = images.clone()
    lo, hi = (0 - PRE.mean) / PRE.std, (1 - PRE.mean) / PRE.std
    aug = BatchAugment(PRE, clahe=True, coarse_dropout=0.2)
    for seeds in ([0] * 8, list(range(8)), list(range(1000, 1008))):
        for x in (images, torch.zeros_like(images), torch.ones_like(images)):
            out = aug(x, seeds)
            assert out.shape == (8, 1, S, S) and out.dtype == torch.float32 and out.device == x.device
            assert torch.isfinite(out).all() and lo - 1e-6 <= out.min() and out.max() <= hi + 1e-6
    assert torch.equal(images, before)
    with pytest.raises(ValueError, match="B draws"):
        aug(images, [0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_batch_matches_the_cpu_except_the_noise_field(images):
    aug = BatchAugment(PRE, clahe=True, coarse_dropout=0.1)
    seeds = list(range(64))
    x = images.repeat(8, 1, 1, 1)
    gpu = aug(x.cuda(), seeds)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    cpu = aug(x, seeds)
    keep = [i for i, d in enumerate(aug.draws(seeds)) if d.noise is None]
    assert len(keep) > 40
    diff = (gpu.cpu()[keep] - cpu[keep]).abs() * PRE.std
    # CLAHE rounds to 256 levels: a float difference can move a pixel by one level (1/255) there
    assert float(diff.mean()) < 1e-4 and float(diff.max()) <= 1 / 255 + 1e-4


def test_augment_on_auto_is_the_workers_on_any_device():
    """auto = workers, also on CUDA: measured on an H200 (16 cores), the batched augmentation on the GPU
    ran in series with the step (97 -> 69 images/s), the workers' in parallel with it."""
    assert AUGMENT_ON == ("auto", "workers", "device")
    assert BackboneOptions().augment_on == "auto"
    assert not augment_on_device("auto", torch.device("cuda")) and not augment_on_device("auto", torch.device("cpu"))
    assert augment_on_device("device", torch.device("cpu")) and not augment_on_device("workers", "cuda")
    with pytest.raises(ValueError):
        augment_on_device("gpu", torch.device("cpu"))


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def test_training_with_device_augmentation_resumes_exactly(capsys, tmp_path, nih_manifest):
    """A few steps of convnext_atto with --augment-on device on the CPU: the losses are those of
    --augment-on workers (the same augmentation), and a run stopped after 2 steps and resumed has
    the losses of the uninterrupted run, exactly."""
    images, _ = nih_subset(tmp_path, nih_manifest, train=32, val=8)
    args = ["train-backbone", "--manifest", tmp_path / "ok.parquet", "--images", images,
            "--model", "convnext_atto", "--size", "64", "--no-pretrained", "--workers", "0",
            "--batch-size", "8", "--log-every", "1", "--val-every", "10", "--clahe", "--coarse-dropout", "0.1"]

    def train(out, *more):
        code, _, err = run_chx(capsys, *args, *more, "-o", tmp_path / out)
        assert code == 0, err
        return _losses(tmp_path / out)

    full = train("full", "--augment-on", "device", "--max-steps", "4")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["options"]["augment_on"] == "device"
    train("cut", "--augment-on", "device", "--max-steps", "2")
    cut = train("cut", "--augment-on", "device", "--max-steps", "4", "--resume")
    assert list(full) == [1, 2, 3, 4] and cut == full
    workers = train("workers", "--augment-on", "workers", "--max-steps", "4")
    assert all(abs(workers[s] - full[s]) <= 1e-4 * abs(full[s]) for s in full), (workers, full)
