"""The image cache (`chx cache-images`, issue 28): images decoded once into a uint8 feature store and
read back by every image reader with --images-cache, giving the same tensors, maps, losses and
weights as the original files, exactly; refused with one line when it does not fit."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from chx.data.datasets import ImageDataset
from chx.data.image_cache import ImageCache
from chx.data.images import from_uint8, load_image, to_uint8
from chx.data.manifest import build_manifest, read_manifest, write_manifest
from chx.data.transforms import Preprocess
from chx.options import CacheImagesOptions
from chx.pipeline.cache_images import cache_images
from chx.store import _codec, open_store
from helpers import nih_subset, one_line, run_chx, shared_path

TINY = ["--model", "test_convnext", "--size", "64", "--no-pretrained", "--workers", "0"]


def _quiet(*_a, **_k):
    pass


def _cache(manifest, images, out, size=64, mode="letterbox", **kw):
    o = CacheImagesOptions(manifest=manifest, out=str(out), size=size, resize=mode, workers=0, **kw)
    return cache_images(o, images, echo=_quiet)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Real X-rays in every format the readers take: covid PNGs (RGB and grey, various sizes), NIH
    PNGs, JPEGs made from real PNGs (one MIMIC-like 2,544 x 3,056 one: JPEG draft mode) and both
    DICOMs (JPEG-compressed, MONOCHROME1 and 2); a manifest over them."""
    root = tmp_path_factory.mktemp("mixed")
    covid = sorted(shared_path("covid-cxr", "images").glob("*.png"))[:6]
    nih = sorted(shared_path("nih-64px", "images").glob("*.png"))[:4]
    dicoms = [shared_path("dicom", "monochrome1_sample.dcm"), shared_path("dicom", "siim_pneumothorax_sample.dcm")]
    names = []
    for src in covid + nih + dicoms:
        shutil.copy(src, root / src.name)
        names.append(src.name)
    for i, src in enumerate(covid[:2]):
        with Image.open(src) as im:
            im = im.convert("L")
            if i == 0:
                im = im.resize((2544, 3056), Image.BICUBIC)
            im.save(root / f"jpeg{i}.jpg", quality=90)
        names.append(f"jpeg{i}.jpg")
    n = len(names)
    ids = pl.DataFrame({"image_id": [f"i{k}" for k in range(n)], "study_id": [f"s{k // 2}" for k in range(n)],
                        "subject_id": [f"p{k // 2}" for k in range(n)], "view": ["PA"] * n, "path": names,
                        "split": ["train"] * n})
    df = build_manifest(ids, pl.DataFrame({"Finding": [(k // 2) % 2 for k in range(n)]}))
    write_manifest(df, root / "m.parquet")
    return root, root / "m.parquet"


def test_uint8_is_a_stored_dtype_read_back_as_is():
    x = np.array([[[[0, 1, 254, 255]]]], dtype=np.uint8)
    stored, scale = _codec.encode(x, "uint8")
    assert scale is None and stored.dtype == np.uint8 and np.array_equal(_codec.decode(stored, "uint8"), x)
    assert np.array_equal(_codec.encode(np.array([[[[0.4, 254.6, 300.0, -2.0]]]]), "uint8")[0], [[[[0, 255, 255, 0]]]])
    assert not _codec.nonfinite_rows(np.full((3, 1, 2, 3), 255, np.uint8), "uint8").any()
    assert "uint8" not in _codec.FEATURE_DTYPES      # extract-features --dtype never offers it


def test_load_image_is_quantized_and_round_trips_through_uint8(mixed):
    root, _ = mixed
    x = load_image(root / "jpeg0.jpg", 64)
    steps = x * 255
    assert torch.allclose(steps, steps.round(), atol=1e-4)     # 8-bit steps
    assert torch.equal(from_uint8(to_uint8(x)), x)
    assert len(torch.unique(x)) > 50                 # a real image, not a constant


@pytest.mark.parametrize("mode", ["letterbox", "squash"])
def test_cache_gives_the_original_tensors_exactly_png_jpeg_dicom(tmp_path, mixed, mode):
    root, manifest = mixed
    r = _cache(manifest, root, tmp_path / "c.zarr", size=48, mode=mode)
    assert r.complete and r.written == 14
    pre = Preprocess(48, mode)
    df = read_manifest(manifest)
    files = ImageDataset(df, root, pre)
    cached = ImageDataset(df, None, pre, cache=ImageCache(tmp_path / "c.zarr", pre))
    for i in range(len(files)):
        assert torch.equal(files[i]["image"], cached[i]["image"]), df["path"][i]
    # training items too: the same augmentation of the same tensor
    aug = dict(clahe=True, coarse_dropout=0.5)
    files = ImageDataset(df, root, pre, train=True, augment=aug)
    cached = ImageDataset(df, None, pre, train=True, augment=aug, cache=ImageCache(tmp_path / "c.zarr", pre))
    assert all(torch.equal(files[(i, 7 + i)]["image"], cached[(i, 7 + i)]["image"]) for i in range(len(files)))
    with open_store(tmp_path / "c.zarr") as s:
        assert s.dtype == "uint8" and s.feature_shape == (1, 48, 48)
        assert s.fingerprint["kind"] == "images" and s.fingerprint["mode"] == mode
        assert s.verify().ok


def test_resumable_sharded_and_repaired(tmp_path, mixed):
    root, manifest = mixed
    out = tmp_path / "c.zarr"
    first = _cache(manifest, root, out, shard="0/2", shard_images=4)     # shards 0 and 2 of 0..3
    assert (first.written, first.remaining, first.complete) == (8, 6, False)
    with pytest.raises(Exception, match="not complete"):
        ImageCache(out, Preprocess(64))
    second = _cache(manifest, root, out, shard="1/2", shard_images=4)
    assert second.complete and second.written == 6
    again = _cache(manifest, root, out, shard_images=4)
    assert again.complete and again.written == 0          # nothing left to do
    # damage one shard object: verify finds it, --repair decodes that shard again
    obj = max((p for p in (out / "features").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    obj.write_bytes(bytes(raw))
    with open_store(out) as s:
        assert len(s.verify().bad_shards) == 1
    fixed = _cache(manifest, root, out, repair=True, shard_images=4)
    assert fixed.written == 4
    with open_store(out) as s:
        assert s.verify().ok


@pytest.fixture(scope="module")
def nih(tmp_path_factory, nih_manifest):
    """40 real NIH images (30 train, 10 val), their manifest and a 64 px cache of them."""
    root = tmp_path_factory.mktemp("nih-cache")
    images, _ = nih_subset(root, nih_manifest)
    _cache(root / "ok.parquet", images, root / "c.zarr")
    return root, images, root / "ok.parquet", root / "c.zarr"


def _metrics(run) -> list[float]:
    import json
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]


def test_train_backbone_and_extract_from_the_cache_equal_the_originals(capsys, tmp_path, nih):
    """Item 5: the same losses and weights, stopped and resumed exactly, from files or from the cache;
    and extract-features writes the same maps, byte for byte."""
    from chx.models import load_checkpoint

    root, images, manifest, cache = nih
    run = ["train-backbone", "--manifest", manifest, *TINY, "--batch-size", "4", "--epochs", "1",
           "--log-every", "1", "--max-steps", "4"]
    code, _, err = run_chx(capsys, *run, "--images", images, "-o", tmp_path / "files")
    assert code == 0, err
    # from the cache, without the image files, stopped after 2 steps and resumed (the cache taken from config.json)
    code, _, err = run_chx(capsys, *run[:-1], "2", "--images-cache", cache, "--images", tmp_path, "-o",
                           tmp_path / "cached")
    assert code == 0, err
    code, _, err = run_chx(capsys, "train-backbone", "--resume", "--max-steps", "4", "-o", tmp_path / "cached")
    assert code == 0, err
    assert _metrics(tmp_path / "files") == _metrics(tmp_path / "cached") and len(_metrics(tmp_path / "files")) == 4
    a = load_checkpoint(tmp_path / "files" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cached" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    best = tmp_path / "files" / "best.pt"
    for name, extra in (("files", ["--images", images]), ("cached", ["--images-cache", cache])):
        code, _, err = run_chx(capsys, "extract-features", "--checkpoint", best, "--manifest", manifest,
                               "--store", tmp_path / f"{name}.zarr", "--workers", "0", "--flip", *extra)
        assert code == 0, err
    with open_store(tmp_path / "files.zarr") as f, open_store(tmp_path / "cached.zarr") as c:
        assert f.fingerprint == c.fingerprint and f.image_ids == c.image_ids
        for s in range(f.n_shards):
            (fa, ff), (ca, cf) = f.read_shard(s), c.read_shard(s)
            assert fa.tobytes() == ca.tobytes() and ff.tobytes() == cf.tobytes()

    # pseudo-label and evaluate read it too, to the same numbers
    for name, extra in (("files", ["--images", images]), ("cached", ["--images-cache", cache])):
        code, _, err = run_chx(capsys, "evaluate", "--checkpoint", best, "--manifest", manifest, "--split", "val",
                               "--bootstrap", "0", "--workers", "0", "-o", tmp_path / f"eval-{name}", *extra)
        assert code == 0, err
    assert (tmp_path / "eval-files" / "predictions.csv").read_bytes() == \
        (tmp_path / "eval-cached" / "predictions.csv").read_bytes()
    # a feature store is not an image cache
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", best, "--manifest", manifest, "--split", "val",
                           "--images-cache", tmp_path / "files.zarr", "-o", tmp_path / "eval-x")
    one_line(code, err, "is a feature store", "not an image cache")


def test_a_cache_that_does_not_fit_is_refused_with_one_line(capsys, tmp_path, nih, mixed):
    root, images, manifest, cache = nih
    base = ["train-backbone", "--manifest", manifest, "--model", "test_convnext", "--no-pretrained", "--workers", "0",
            "--images", images, "--max-steps", "1"]
    run = [*base, "--size", "64"]
    # another size
    code, _, err = run_chx(capsys, *base, "--size", "32", "--images-cache", cache, "-o", tmp_path / "a")
    one_line(code, err, "holds 64 px letterbox images", "preprocesses to 32 px letterbox", "chx cache-images",
             "--size 32")
    # another resize mode
    code, _, err = run_chx(capsys, *run, "--resize", "squash", "--images-cache", cache, "-o", tmp_path / "b")
    one_line(code, err, "--resize squash")
    # a cache of other images (the mixed manifest's ids)
    other = tmp_path / "other.zarr"
    _cache(mixed[1], mixed[0], other)
    code, _, err = run_chx(capsys, *run, "--images-cache", other, "-o", tmp_path / "c")
    one_line(code, err, "lacks 30 of the manifest's 30 images", "chx cache-images")
    # an unfinished cache
    half = tmp_path / "half.zarr"
    _cache(manifest, images, half, shard="0/2", shard_images=8)
    code, _, err = run_chx(capsys, *run, "--images-cache", half, "-o", tmp_path / "d")
    one_line(code, err, "is not complete", "rerunning the same `chx cache-images`")
    # neither --size nor --checkpoint
    code, _, err = run_chx(capsys, "cache-images", "--manifest", manifest, "--images", images, "-o", tmp_path / "x",
                           "--workers", "0")
    one_line(code, err, "give --size")


def test_cache_images_command_in_its_own_process(tmp_path, nih):
    from test_cli_subprocess import one_error_line, run as run_subprocess

    root, images, manifest, _ = nih
    code, out, err = run_subprocess("cache-images", "--manifest", manifest, "--images", images, "--size", "32",
                                    "--resize", "squash", "-o", tmp_path / "c.zarr")
    assert code == 0, err[-2000:]
    assert "cached 40 images (32 px squash)" in out and "is complete" in out
    code, out, err = run_subprocess("store", "info", tmp_path / "c.zarr")
    assert code == 0 and "kind=images" in out and "size=32" in out and "uint8" in out
    # a broken image: one line naming it, no cache marked complete
    df = read_manifest(manifest)
    (images / "broken.png").write_bytes(b"not an image")
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("broken.png")).otherwise(pl.col("path"))
                         .alias("path"))
    write_manifest(df, tmp_path / "bad.parquet")
    code, _, err = run_subprocess("cache-images", "--manifest", tmp_path / "bad.parquet", "--images", images,
                                  "--size", "32", "-o", tmp_path / "bad.zarr")
    assert code == 2
    one_error_line(err, "broken.png")
    with open_store(tmp_path / "bad.zarr") as s:
        assert not s.complete


def test_study_images_from_the_cache_equal_the_originals(tmp_path, mixed):
    """train-joint's and evaluate's studies: the same views, augmented the same, from either source."""
    from chx.data.study_images import StudyImageDataset

    root, manifest = mixed
    _cache(manifest, root, tmp_path / "c.zarr", size=32)
    pre, df = Preprocess(32), read_manifest(manifest)
    for train in (False, True):
        files = StudyImageDataset(df, root, pre, max_views=2, train=train)
        cached = StudyImageDataset(df, None, pre, max_views=2, train=train, cache=ImageCache(tmp_path / "c.zarr", pre))
        for i in range(len(files)):
            item = (i, 100 + i) if train else i
            assert torch.equal(files[item]["images"], cached[item]["images"])
