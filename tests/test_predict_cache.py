"""`--images-cache` for predict, explain and an ensemble's evaluate (issue 28 item 2): the models read
a manifest's images from the image cache by image id and give exactly what they give from the files;
ensemble members of another size read the files (a note), or one line without --images."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from chx.data.manifest import read_manifest, write_manifest
from chx.models import load_checkpoint, save_checkpoint
from helpers import one_line, run_chx, shared_path

STUDIES = 12


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory, covid_backbone, covid_models, covid_manifest):
    """A bundle, the first val studies of covid-cxr, their image cache at the backbone's 64 px, and
    a copy of the stage-1 checkpoint that preprocesses to 96 px (a member of another size)."""
    from chx.options import CacheImagesOptions
    from chx.pipeline.cache_images import cache_images
    from chx.pipeline.export import export_bundle

    tmp = tmp_path_factory.mktemp("predict-cache")
    export_bundle(covid_backbone, covid_models["fusion"], tmp / "a.chx")
    val = read_manifest(covid_manifest).filter(pl.col("split") == "val")
    val = val.filter(pl.col("study_id").is_in(val["study_id"].unique(maintain_order=True).head(STUDIES).implode()))
    write_manifest(val, tmp / "val.parquet")
    images = shared_path("covid-cxr", "images")
    cache_images(CacheImagesOptions(manifest=tmp / "val.parquet", out=str(tmp / "c64.zarr"), size=64, workers=0),
                 images, echo=_quiet)
    ckpt = load_checkpoint(covid_backbone, kind="backbone")
    ckpt["preprocess"] = {**ckpt["preprocess"], "size": 96}
    save_checkpoint(ckpt, tmp / "stage1-96.pt")
    return {"tmp": tmp, "bundle": tmp / "a.chx", "val": tmp / "val.parquet", "images": images,
            "cache": tmp / "c64.zarr", "stage1": covid_backbone, "stage1_96": tmp / "stage1-96.pt"}


@pytest.fixture
def cache_reads(monkeypatch):
    """Counts the images read from an image cache (in-process runs, --workers 0)."""
    from chx.data.image_cache import ImageCache

    count, read = [0], ImageCache.read

    def counted(self, row):
        count[0] += 1
        return read(self, row)

    monkeypatch.setattr(ImageCache, "read", counted)
    return count


def test_predict_and_explain_from_the_cache_equal_the_files(capsys, setup, cache_reads):
    s, tmp = setup, setup["tmp"]
    base = ["predict", "--bundle", s["bundle"], "--manifest", s["val"], "--workers", "0"]
    code, _, err = run_chx(capsys, *base, "--images", s["images"], "-o", tmp / "files.csv")
    assert code == 0, err
    # no --images: the files are not needed (and not read)
    code, out, err = run_chx(capsys, *base, "--images-cache", s["cache"], "-o", tmp / "cache.csv")
    assert code == 0, err
    assert f"{STUDIES} studies" in out
    files, cached = pl.read_csv(tmp / "files.csv"), pl.read_csv(tmp / "cache.csv")
    assert files.height == STUDIES and files.equals(cached)
    # explain: the models' input from the cache, the figures from the files: the same explain.json
    ex = ["explain", "--bundle", s["bundle"], "--manifest", s["val"], "--images", s["images"], "--limit", "3"]
    assert run_chx(capsys, *ex, "-o", tmp / "ex-files")[0] == 0
    before = cache_reads[0]
    code, _, err = run_chx(capsys, *ex, "--images-cache", s["cache"], "-o", tmp / "ex-cache")
    assert code == 0, err
    assert cache_reads[0] > before         # the models' input came from the cache
    a, b = (json.loads((tmp / d / "explain.json").read_text()) for d in ("ex-files", "ex-cache"))
    assert a == b and len(a["studies"]) == 3
    before = cache_reads[0]
    code, _, err = run_chx(capsys, "explain", "--checkpoint", s["stage1"], "--manifest", s["val"], "--images",
                           s["images"], "--limit", "2", "--images-cache", s["cache"], "-o", tmp / "ex-s1-cache")
    assert code == 0, err
    assert cache_reads[0] > before
    code, _, err = run_chx(capsys, "explain", "--checkpoint", s["stage1"], "--manifest", s["val"], "--images",
                           s["images"], "--limit", "2", "-o", tmp / "ex-s1-files")
    assert code == 0, err
    a, b = (json.loads((tmp / d / "explain.json").read_text()) for d in ("ex-s1-files", "ex-s1-cache"))
    assert a == b


def test_an_ensemble_reads_the_cache_where_it_fits_and_the_files_elsewhere(capsys, setup, cache_reads):
    s, tmp = setup, setup["tmp"]
    code, _, err = run_chx(capsys, "ensemble", s["bundle"], s["stage1"], s["stage1_96"], "-o", tmp / "ens")
    assert code == 0, err
    base = ["predict", "--bundle", tmp / "ens", "--manifest", s["val"], "--workers", "0"]
    code, _, err = run_chx(capsys, *base, "--images", s["images"], "-o", tmp / "ens-files.csv")
    assert code == 0, err
    code, _, err = run_chx(capsys, *base, "--images", s["images"], "--images-cache", s["cache"],
                           "-o", tmp / "ens-cache.csv")
    assert code == 0, err
    assert "note:" in err and "stage1-96.pt (96 px letterbox) read the image files" in err
    assert pl.read_csv(tmp / "ens-files.csv").equals(pl.read_csv(tmp / "ens-cache.csv"))
    # without --images the 96 px member has nothing to read: one line, nothing written
    code, _, err = run_chx(capsys, *base, "--images-cache", s["cache"], "-o", tmp / "ens-no-images.csv")
    one_line(code, err, "stage1-96.pt", "--images ROOT")
    assert not (tmp / "ens-no-images.csv").exists()
    # evaluate of the ensemble: the same scores from the cache
    ev = ["evaluate", "--checkpoint", tmp / "ens", "--manifest", s["val"], "--split", "val", "--workers", "0",
          "--bootstrap", "0"]
    assert run_chx(capsys, *ev, "--images", s["images"], "-o", tmp / "ev-files")[0] == 0
    before = cache_reads[0]
    code, _, err = run_chx(capsys, *ev, "--images", s["images"], "--images-cache", s["cache"], "-o", tmp / "ev-cache")
    assert code == 0, err
    assert cache_reads[0] > before
    a, b = (json.loads((tmp / d / "metrics.json").read_text()) for d in ("ev-files", "ev-cache"))
    assert a["mAP"] == b["mAP"] and a["members"] == b["members"]


def test_a_cache_that_does_not_serve_the_inputs_is_one_line(capsys, setup, tmp_path):
    s = setup
    base = ["predict", "--bundle", s["bundle"], "--workers", "0", "-o", tmp_path / "p.csv"]
    code, _, err = run_chx(capsys, *base, "--files", shared_path("covid-cxr", "images").iterdir().__next__(),
                           "--images-cache", s["cache"])
    one_line(code, err, "--images-cache", "--manifest")
    code, _, err = run_chx(capsys, *base, "--manifest", s["val"], "--images-cache", s["cache"], "--runtime",
                           "onnxruntime")
    one_line(code, err, "--images-cache needs --runtime torch")
    from chx.options import CacheImagesOptions
    from chx.pipeline.cache_images import cache_images

    cache_images(CacheImagesOptions(manifest=s["val"], out=str(tmp_path / "c32.zarr"), size=32, workers=0),
                 s["images"], echo=_quiet)
    code, _, err = run_chx(capsys, *base, "--manifest", s["val"], "--images-cache", tmp_path / "c32.zarr")
    one_line(code, err, "32 px", "64 px", "chx cache-images")
    code, _, err = run_chx(capsys, "ensemble", s["bundle"], s["stage1_96"], "-o", tmp_path / "ens")
    assert code == 0, err
    code, _, err = run_chx(capsys, "predict", "--bundle", tmp_path / "ens", "--manifest", s["val"], "--images-cache",
                           tmp_path / "c32.zarr", "-o", tmp_path / "q.csv")
    one_line(code, err, "no member", "64 px letterbox, 96 px letterbox")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "q.csv").exists()


def test_predict_from_the_cache_in_its_own_process(setup, tmp_path):
    """The console script with its default 2 DataLoader workers (batches of 4, so that they start)
    reading the cache: exit 0, the same table as in-process, no process left."""
    from test_cli_subprocess import run as run_subprocess

    s = setup
    code, out, err = run_subprocess("predict", "--bundle", s["bundle"], "--manifest", s["val"], "--images-cache",
                                    s["cache"], "--batch-size", "4", "-o", tmp_path / "p.csv")
    assert code == 0, err[-2000:]
    assert f"{STUDIES} studies" in out
    table = pl.read_csv(tmp_path / "p.csv")
    assert table.height == STUDIES and np.isfinite(table.drop("study_id").to_numpy()).all()
    code, _, err = run_subprocess("predict", "--bundle", s["bundle"], "--manifest", s["val"], "--images",
                                  s["images"], "--batch-size", "4", "-o", tmp_path / "f.csv")
    assert code == 0, err[-2000:]
    assert pl.read_csv(tmp_path / "f.csv").equals(table)


def test_a_manifest_whose_images_are_gone_is_served_by_the_cache(capsys, setup, tmp_path):
    """A manifest and its cache copied to a machine without the images (the manifest records a root
    that does not exist there): predict and evaluate read the cache; without it, one line naming the
    missing root."""
    s = setup
    gone = tmp_path / "gone.parquet"
    write_manifest(read_manifest(s["val"]), gone, images_root=tmp_path / "no-such-images")
    code, _, err = run_chx(capsys, "predict", "--bundle", s["bundle"], "--manifest", gone, "--images-cache",
                           s["cache"], "--workers", "0", "-o", tmp_path / "p.csv")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "p.csv").height == STUDIES
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", s["stage1"], "--manifest", gone, "--images-cache",
                           s["cache"], "--split", "val", "--workers", "0", "--bootstrap", "0", "-o", tmp_path / "ev")
    assert code == 0, err
    code, _, err = run_chx(capsys, "predict", "--bundle", s["bundle"], "--manifest", gone, "-o", tmp_path / "q.csv")
    one_line(code, err, "no-such-images", "no longer exists")
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", s["stage1"], "--manifest", gone, "--split", "val",
                           "-o", tmp_path / "ev2")
    one_line(code, err, "no-such-images", "no longer exists")


def test_compare_an_ensemble_refusals_and_distinct_row_names(capsys, setup, tmp_path):
    from chx.pipeline.compare import row_names

    s = setup
    base = ["compare", "--manifest", s["val"], "--images", s["images"]]
    code, _, err = run_chx(capsys, *base, "--ensemble", s["tmp"])
    one_line(code, err, "is not an ensemble bundle", "chx ensemble")
    code, _, err = run_chx(capsys, *base, "--ensemble", s["bundle"])
    one_line(code, err, "is not an ensemble bundle")
    assert run_chx(capsys, "ensemble", s["bundle"], "-o", tmp_path / "ens")[0] == 0
    code, _, err = run_chx(capsys, *base, "--ensemble", tmp_path / "ens", "--groups", "thirds")
    one_line(code, err, "--groups", "drop --groups")
    assert row_names(["a/m.chx", "b", "a/m.chx", "ensemble"]) == ["a/m.chx (member 1)", "b", "a/m.chx (member 3)",
                                                                  "ensemble (member 4)"]


def test_compare_and_evaluate_an_ensemble_in_their_own_process(setup, tmp_path):
    """`chx compare --ensemble` and `chx evaluate` of an ensemble as the console script with default
    workers (batches of 4, so that they start), from the image cache: exit 0, the table, the
    same figures from both, no process left; a folder that is no ensemble: one line."""
    from test_cli_subprocess import one_error_line, run as run_subprocess

    s = setup
    code, _, err = run_subprocess("ensemble", s["bundle"], s["stage1"], "-o", tmp_path / "ens")
    assert code == 0, err[-2000:]
    data = ["--manifest", s["val"], "--images-cache", s["cache"], "--split", "val", "--batch-size", "4",
            "--bootstrap", "100"]
    code, out, err = run_subprocess("compare", "--ensemble", tmp_path / "ens", *data, "-o", tmp_path / "c.md")
    assert code == 0, err[-2000:]
    assert "ensemble − member [95 % CI]" in out and f"| ensemble | {STUDIES} |" in out
    code, out, err = run_subprocess("evaluate", "--checkpoint", tmp_path / "ens", *data, "-o", tmp_path / "ev")
    assert code == 0, err[-2000:]
    compared = json.loads((tmp_path / "c.json").read_text())
    rows = json.loads((tmp_path / "ev" / "metrics.json").read_text())["members"]
    assert [r["mAP"] for r in rows] == pytest.approx([compared[r["model"]]["mAP"] for r in rows], abs=1e-12)
    code, _, err = run_subprocess("compare", "--ensemble", s["tmp"], *data)
    assert code == 2
    one_error_line(err, "is not an ensemble bundle")
