"""`chx export --ensemble ENS --format hf|onnx` (issue 29): an ensemble folder of the same layout
whose members are hf or onnx export folders, with the same names and weights; it predicts the
source ensemble's probabilities (hf exactly, onnx within the export's tolerance under --runtime
onnxruntime); stage-1 members, --format bundle and --ensemble with other models are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from chx.data.manifest import read_manifest, write_manifest
from chx.engine.ensemble import EnsemblePredictor
from chx.errors import ChxError
from chx.pipeline.ensemble import make_ensemble
from chx.pipeline.export import ONNX_TOLERANCE, export_ensemble
from chx.pipeline.predict import collect_inputs
from helpers import one_line, run_chx, shared_path

STUDIES = 8       # val studies: enough to differ, quick on the CPU


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


onnx = pytest.mark.skipif(not (_has("onnxruntime") and _has("onnxscript")),
                          reason="the onnx extra (pip install 'chx[onnx]')")


def _specs() -> dict:
    from chx.cli import cli
    from chx.cli._base import _option_specs

    return {name: _option_specs(command) for name, command in cli.commands.items()}


@pytest.fixture(scope="module")
def ens(tmp_path_factory, covid_backbone, covid_models, covid_manifest):
    """An ensemble of a bundle file and an hf folder (two fusion models of other seeds, weights 2:1),
    one with a stage-1 member, and val studies."""
    from chx.options import FusionOptions, TrainConfig
    from chx.pipeline.export import export_bundle, export_hf
    from chx.pipeline.train_fusion import train_fusion

    tmp = tmp_path_factory.mktemp("ensemble-export")
    train_fusion(covid_models["store"], tmp / "fusion-2", FusionOptions(dim=32, heads=4, ffn_dim=64),
                 TrainConfig(epochs=1, max_steps=3, workers=0, device="cpu", seed=1))
    export_bundle(covid_backbone, covid_models["fusion"], tmp / "a.chx")
    export_hf(covid_backbone, tmp / "fusion-2" / "best.pt", tmp / "b-hf", _specs())
    make_ensemble([tmp / "a.chx", tmp / "b-hf"], tmp / "ens", weights="2,1")
    make_ensemble([tmp / "a.chx", covid_backbone], tmp / "ens-stage1")
    images = shared_path("covid-cxr", "images")
    val = read_manifest(covid_manifest).filter(pl.col("split") == "val")
    keep = val["study_id"].unique(maintain_order=True).head(STUDIES)
    write_manifest(val.filter(pl.col("study_id").is_in(keep.implode())), tmp / "val.parquet")
    inputs = collect_inputs(manifest=tmp / "val.parquet", images=images)
    studies = [([Path(f) for f in g["file"]], g["view"].to_list(), g["image_id"].to_list())
               for _, g in inputs.group_by("study_id", maintain_order=True)]
    source = EnsemblePredictor.load(tmp / "ens", device="cpu")
    return {"tmp": tmp, "ens": tmp / "ens", "stage1": tmp / "ens-stage1", "studies": studies,
            "val": tmp / "val.parquet", "images": images, "backbone": covid_backbone,
            "want": source.predict_studies(studies, workers=0, show_progress=False)}


def _doc(folder: Path) -> dict:
    return json.loads((folder / "ensemble.json").read_text())


def _same_members(got: dict, want: dict, kind: str) -> None:
    """The exported ensemble.json: the source's names, weights and classes, members of ``kind``."""
    assert got["class_names"] == want["class_names"]
    assert [(m["name"], m["weight"]) for m in got["members"]] == [(m["name"], m["weight"]) for m in want["members"]]
    assert [m["kind"] for m in got["members"]] == [kind] * len(want["members"])


def test_hf_export_of_an_ensemble_predicts_as_the_ensemble(ens, tmp_path, capsys):
    out = tmp_path / "ens-hf"
    doc = export_ensemble(ens["ens"], "hf", out, _specs())["doc"]
    assert doc == _doc(out)
    _same_members(doc, _doc(ens["ens"]), "bundle")
    folders = [out / m["path"] for m in doc["members"]]
    for folder in folders:
        assert folder.is_dir() and folder.parent == out / "members"
        assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                                      ".chx-output.json"}      # as export_hf writes it
    card = (folders[0] / "README.md").read_text()      # of the bundle file: made from its runs
    assert card.startswith("---\nlibrary_name: chx") and "chx train-fusion" in card
    assert "chx export --ensemble ens --format hf" in card
    assert (folders[1] / "README.md").read_text() == (ens["tmp"] / "b-hf" / "README.md").read_text()   # its own
    got = EnsemblePredictor.load(out, device="cpu").predict_studies(ens["studies"], workers=0, show_progress=False)
    np.testing.assert_allclose(got, ens["want"], rtol=0, atol=1e-6)

    # predict and evaluate take it as they take the source ensemble
    code, _, err = run_chx(capsys, "predict", "--bundle", out, "--manifest", ens["val"], "--images", ens["images"],
                           "--workers", "0", "-o", tmp_path / "p.csv")
    assert code == 0, err
    np.testing.assert_allclose(pl.read_csv(tmp_path / "p.csv").drop("study_id").to_numpy(), ens["want"], rtol=1e-6,
                               atol=1e-6)
    code, _, err = run_chx(capsys, "evaluate", "--checkpoint", out, "--manifest", ens["val"], "--images",
                           ens["images"], "--split", "val", "--bootstrap", "0", "--workers", "0",
                           "-o", tmp_path / "eval")
    assert code == 0, err
    assert len(json.loads((tmp_path / "eval" / "metrics.json").read_text())["members"]) == 3

    # each written member's sha256 is the record's: an edited member is refused
    config = out / doc["members"][1]["path"] / "config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(ChxError, match="sha256 differs"):
        EnsemblePredictor.load(out, device="cpu")


@onnx
def test_onnx_export_of_an_ensemble_predicts_under_onnxruntime(ens, tmp_path, capsys):
    out = tmp_path / "ens-onnx"
    code, stdout, err = run_chx(capsys, "export", "--ensemble", ens["ens"], "--format", "onnx", "-o", out)
    assert code == 0, err
    assert "checked: ONNX Runtime's probabilities are within" in stdout and "2 onnx members" in stdout
    doc = _doc(out)
    _same_members(doc, _doc(ens["ens"]), "onnx")
    for m in doc["members"]:
        assert {"backbone.onnx", "fusion.onnx", "config.json"} <= {p.name for p in (out / m["path"]).iterdir()}
    loaded = EnsemblePredictor.load(out, runtime="onnxruntime")
    assert loaded.fusion_config["max_views"] == 4          # for predict's unknown-views warning
    args = ["predict", "--bundle", out, "--manifest", ens["val"], "--images", ens["images"], "--workers", "0"]
    code, _, err = run_chx(capsys, *args, "--runtime", "onnxruntime", "-o", tmp_path / "p.csv")
    assert code == 0, err
    table = pl.read_csv(tmp_path / "p.csv")
    assert table.height == STUDIES
    np.testing.assert_allclose(table.drop("study_id").to_numpy(), ens["want"], rtol=0, atol=ONNX_TOLERANCE)

    # each ensemble runs on its own runtime only: one line saying which
    code, _, err = run_chx(capsys, *args, "-o", tmp_path / "q.csv")
    one_line(code, err, "ensemble of ONNX exports", "--runtime onnxruntime")
    code, _, err = run_chx(capsys, "predict", "--bundle", ens["ens"], "--manifest", ens["val"], "--images",
                           ens["images"], "--runtime", "onnxruntime", "-o", tmp_path / "r.csv")
    one_line(code, err, "ensemble of torch models", "--runtime torch")
    assert not (tmp_path / "q.csv").exists() and not (tmp_path / "r.csv").exists()


def test_a_stage_1_member_is_refused_by_name(ens, tmp_path, capsys):
    name = _doc(ens["stage1"])["members"][1]["name"]
    for fmt in ("hf", "onnx"):
        code, _, err = run_chx(capsys, "export", "--ensemble", ens["stage1"], "--format", fmt, "-o", tmp_path / fmt)
        one_line(code, err, f"ensemble member {name!r}", "stage-1 checkpoint", "without it")
        assert not (tmp_path / fmt).exists()


def test_ensemble_goes_alone_and_not_as_a_bundle(ens, tmp_path, capsys):
    out = tmp_path / "x"
    code, _, err = run_chx(capsys, "export", "--ensemble", ens["ens"], "-o", out)      # --format bundle
    one_line(code, err, "already is a bundle", "copy the folder whole")
    code, _, err = run_chx(capsys, "export", "--ensemble", ens["ens"], "--backbone", ens["backbone"], "--format",
                           "hf", "-o", out)
    one_line(code, err, "--ensemble", "alone", "--backbone")
    code, _, err = run_chx(capsys, "export", "--backbone", ens["ens"], "--fusion", ens["ens"], "--format", "hf",
                           "-o", out)
    one_line(code, err, "is an ensemble bundle", "--ensemble")
    code, _, err = run_chx(capsys, "export", "--ensemble", ens["tmp"] / "b-hf", "--format", "hf", "-o", out)
    one_line(code, err, "is not an ensemble bundle", "chx ensemble")
    assert not out.exists()


def test_cli_export_of_an_ensemble_in_its_own_process(ens, tmp_path):
    from test_cli_subprocess import finish, start

    out = tmp_path / "ens-hf"
    code, stdout, err = finish(start("export", "--ensemble", ens["ens"], "--format", "hf", "-o", out))
    assert code == 0, err
    assert f"wrote {out}: 2 hf members, " in stdout
    assert [m["kind"] for m in _doc(out)["members"]] == ["bundle", "bundle"]


def test_a_members_card_describes_only_the_runs_that_made_it(ens, covid_models):
    """The model card of an exported member uses a recorded checkpoint only when it holds the
    member's weights: a path now holding another run's checkpoint, or none, is left out."""
    from chx.models import load_checkpoint
    from chx.pipeline.export import _runs

    bundle = load_checkpoint(ens["tmp"] / "a.chx", kind="bundle")
    assert [kind for kind, _, _ in _runs(bundle)] == ["backbone", "fusion"]
    other = {**bundle, "sources": {**bundle["sources"], "fusion": str(ens["tmp"] / "fusion-2" / "best.pt")}}
    assert [kind for kind, _, _ in _runs(other)] == ["backbone"]
    gone = {**bundle, "sources": {"backbone": str(ens["tmp"] / "nowhere.pt"), "fusion": bundle["sources"]["fusion"]}}
    assert [kind for kind, _, _ in _runs(gone)] == ["fusion"]
