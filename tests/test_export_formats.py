"""chx export --format hf / onnx: the Hugging Face folder loads offline in `chx predict --bundle DIR`
with the .pt bundle's probabilities; the ONNX graphs give torch's probabilities within 1e-4 for 1 to
max-views views (and padded slots); a missing onnxruntime / onnx is one line."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import polars as pl
import pytest
import torch

from helpers import run_chx, shared_path

IMAGES = ("000001-12.png", "000001-17.png", "000002-14.png", "000001-19.png")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two study folders of real images: one with two views, one with one."""
    src = shared_path("covid-cxr", "images")
    root = tmp_path_factory.mktemp("studies")
    for name, files in {"a": IMAGES[:2], "b": IMAGES[2:3]}.items():
        (root / name).mkdir()
        for f in files:
            shutil.copy(src / f, root / name / f)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory, covid_backbone, covid_models):
    """The covid models exported in all three formats, through the CLI."""
    from chx.cli import main   # run_chx needs capsys, which a module fixture cannot have

    tmp = tmp_path_factory.mktemp("export")
    pair = ["--backbone", str(covid_backbone), "--fusion", str(covid_models["fusion"])]
    for fmt, out in (("bundle", "model.chx"), ("hf", "model-hf")):
        main(["export", *pair, "--format", fmt, "-o", str(tmp / out)])
    if _has("onnxruntime") and _has("onnxscript"):
        main(["export", *pair, "--format", "onnx", "-o", str(tmp / "model-onnx")])
    return tmp


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _predict(capsys, tmp_path, bundle, studies, *extra):
    out = tmp_path / f"p-{len(list(tmp_path.iterdir()))}.csv"
    code, _, err = run_chx(capsys, "predict", "--bundle", bundle, "--studies", studies, "-o", out, *extra)
    assert code == 0, err
    return pl.read_csv(out)


def test_hf_folder_predicts_offline_as_the_bundle(capsys, tmp_path, exported, studies, monkeypatch):
    hf = exported / "model-hf"
    assert sorted(p.name for p in hf.iterdir()) == [".chx-output.json", "README.md", "config.json",
                                                    "model.safetensors"]   # the marker: tests/test_overwrite.py
    config = json.loads((hf / "config.json").read_text())
    assert set(config) >= {"architecture", "class_names", "preprocessing", "features"}
    assert set(config["architecture"]) == {"backbone", "fusion"} and config["preprocessing"]["size"] == 64
    card = (hf / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: chx")
    for text in ("## Classes", "## Training data", "## Preprocessing", "## Validation metrics",
                 "## Intended use", "Not a medical device", "chx train-backbone", "chx train-fusion",
                 "chx export", "--format hf", *config["class_names"]):
        assert text in card, text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hf = _predict(capsys, tmp_path, hf, studies)
    from_pt = _predict(capsys, tmp_path, exported / "model.chx", studies)
    assert from_hf.height == 2 and from_hf.equals(from_pt)

    # an hf folder has no ONNX graphs: one line says what to do
    code, _, err = run_chx(capsys, "predict", "--bundle", hf, "--runtime", "onnxruntime", "--studies", studies,
                           "-o", tmp_path / "x.csv")
    assert code == 2 and err.count("\n") == 1 and "backbone.onnx" in err


onnx = pytest.mark.skipif(not (_has("onnxruntime") and _has("onnxscript")),
                          reason="the onnx extra (pip install 'chx[onnx]')")


@onnx
def test_onnx_probabilities_equal_torch_for_every_view_count(capsys, tmp_path, exported, studies):
    from chx.engine.onnx_runtime import OnnxPredictor
    from chx.engine.predictor import Predictor

    folder = exported / "model-onnx"
    torch_p, onnx_p = Predictor.load(exported / "model.chx", device="cpu"), OnnxPredictor.load(folder)
    assert onnx_p.max_views == torch_p.fusion.max_views == 4
    src = shared_path("covid-cxr", "images")
    paths, views = [src / f for f in IMAGES], ["PA", "LATERAL", "AP", "OTHER"]
    for v in range(1, 5):
        args = (paths[:v], views[:v], [f"i{k}" for k in range(v)])
        np.testing.assert_allclose(onnx_p.predict_study(*args), torch_p.predict_study(*args), atol=1e-4, rtol=0)

    # a batch with empty view slots: the mask is part of the graph
    maps = onnx_p.backbone.run(["features"], {"images": torch_p.images(paths).numpy()})[0]   # [4, C, h, w]
    features = np.stack([maps, maps[::-1]])                                                  # [2, 4, C, h, w]
    mask = np.array([[True, True, False, False], [True, True, True, False]])
    types = np.array([[0, 1, 2, 2], [2, 1, 0, 0]], dtype=np.int64)
    got = onnx_p.fusion.run(["probabilities"], {"features": features, "view_mask": mask, "view_types": types})[0]
    with torch.no_grad():
        want = torch.sigmoid(torch_p.fusion(torch.from_numpy(features).float(), torch.from_numpy(mask),
                                            torch.from_numpy(types)))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)

    on_onnx = _predict(capsys, tmp_path, folder, studies, "--runtime", "onnxruntime")
    on_torch = _predict(capsys, tmp_path, exported / "model.chx", studies)
    assert on_onnx["study_id"].to_list() == on_torch["study_id"].to_list()
    np.testing.assert_allclose(on_onnx.drop("study_id").to_numpy(), on_torch.drop("study_id").to_numpy(), atol=1e-4)


@onnx
def test_missing_onnx_packages_are_one_line(capsys, tmp_path, exported, studies, covid_backbone, covid_models,
                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # as if it were not installed
    code, _, err = run_chx(capsys, "predict", "--bundle", exported / "model-onnx", "--runtime", "onnxruntime",
                           "--studies", studies, "-o", tmp_path / "p.csv")
    assert code == 2 and err.count("\n") == 1 and "pip install 'chx[onnx]'" in err
    assert not (tmp_path / "p.csv").exists()

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    code, _, err = run_chx(capsys, "export", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                           "--format", "onnx", "-o", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "pip install 'chx[onnx]'" in err
    assert not (tmp_path / "o").exists()
