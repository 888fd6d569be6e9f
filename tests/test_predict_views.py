"""predict / explain on plain image files: views stated per file (--views), by the file name rule or
by a manifest's view column give the model the inputs training gave it; unknown views warn once.
Batched prediction of a manifest (--batch-size, --workers, --split) equals one study at a time. Weak
inputs (a folder as --files or --manifest, duplicate files, non-UTF-8 names) are one line or escaped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from chx.data.manifest import read_manifest, write_manifest
from chx.data.views import file_name_view
from helpers import ROOT, run_chx, shared_path


@pytest.mark.parametrize("name, view", [
    ("view3_lateral.jpg", "LATERAL"), ("s1-PA.png", "PA"), ("x_ap_supine.dcm", "AP"), ("view1_frontal.jpg", "PA"),
    ("IMG.LAT.2.jpeg", "LATERAL"), ("p7_LL.png", "LL"), ("Posteroanterior.png", "PA"),
    ("000001-12.png", None), ("chestPA.png", None), ("capture_pal.png", None), ("pa_and_lat.png", None),
    ("l.png", None), ("x_rl.png", None), ("lateral", "LATERAL")])
def test_file_name_rule(name, view):
    assert file_name_view(name) == view


@pytest.fixture(scope="module")
def view_models(tmp_path_factory, covid_models, covid_backbone, covid_manifest):
    """A fusion model with a view-type embedding (2 steps) on the covid store, and one multi-view
    validation study (a frontal and a lateral view) as its own manifest."""
    from chx.options import FusionOptions, TrainConfig
    from chx.pipeline.train_fusion import train_fusion

    tmp = tmp_path_factory.mktemp("views")
    train_fusion(covid_models["store"], tmp / "fusion", FusionOptions(dim=32, heads=4, ffn_dim=64, view_embedding=True),
                 TrainConfig(epochs=1, max_steps=2, workers=0, device="cpu"))
    val = read_manifest(covid_manifest).filter(pl.col("split") == "val")
    both = (val.group_by("study_id", maintain_order=True).agg(pl.col("view"))
            .filter(pl.col("view").list.contains("LATERAL") & (pl.col("view").list.len() == 2)
                    & (pl.col("view").list.contains("PA") | pl.col("view").list.contains("AP"))))
    study = val.filter(pl.col("study_id") == both["study_id"][0])
    write_manifest(study, tmp / "study.parquet")
    write_manifest(val, tmp / "val.parquet")
    return {"tmp": tmp, "models": ["--backbone", covid_backbone, "--fusion", tmp / "fusion" / "best.pt"],
            "study": study, "manifest": tmp / "study.parquet", "val": tmp / "val.parquet",
            "images": shared_path("covid-cxr", "images")}


def _probs(path) -> np.ndarray:
    table = pl.read_csv(path)
    return table.drop("study_id").to_numpy()


def _copies(vm, tmp, names) -> list:
    """The study's images copied under ``names`` (in the manifest's row order)."""
    tmp.mkdir(exist_ok=True)
    out = []
    for p, name in zip(vm["study"]["path"], names):
        shutil.copy(vm["images"] / p, tmp / name)
        out.append(tmp / name)
    return out


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "have no known view" in line]


def test_files_with_views_equal_the_manifest_and_unknown_views_warn_once(capsys, tmp_path, view_models):
    vm = view_models
    views = vm["study"]["view"].to_list()
    code, _, err = run_chx(capsys, "predict", *vm["models"], "--manifest", vm["manifest"], "--images", vm["images"],
                           "-o", tmp_path / "m.csv")
    assert code == 0, err
    assert not _warnings(err)                                          # a manifest states its views
    want = _probs(tmp_path / "m.csv")

    plain = _copies(vm, tmp_path / "plain", ["first.png", "second.png"])
    named = _copies(vm, tmp_path / "named", [f"img{i}_{v.lower()}.png" for i, v in enumerate(views)])
    cases = {
        "views": ["--files", *plain, "--views", ",".join(views)],
        "views reversed": ["--files", *plain[::-1], "--views", ",".join(views[::-1])],
        "native names": ["--files", *plain, "--views", ",".join("L" if v == "LATERAL" else v.lower() for v in views)],
        "file names": ["--files", *named],
        "file names, auto": ["--files", *named, "--views", "auto,auto"],
    }
    for case, args in cases.items():
        code, _, err = run_chx(capsys, "predict", *vm["models"], *args, "--study-id", vm["study"]["study_id"][0],
                               "-o", tmp_path / "f.csv", "--overwrite")
        assert code == 0, (case, err)
        assert not _warnings(err), case
        np.testing.assert_allclose(_probs(tmp_path / "f.csv"), want, rtol=0, atol=1e-5, err_msg=case)

    # Unstated views: typed OTHER, a different input for a view-embedding model, and one warning line.
    code, _, err = run_chx(capsys, "predict", *vm["models"], "--files", *plain, "-o", tmp_path / "u.csv",
                           "--explain", tmp_path / "u-explained")
    assert code == 0, err
    assert len(_warnings(err)) == 1 and "2 of 2 image(s)" in err and "--views" in err
    assert np.abs(_probs(tmp_path / "u.csv") - want).max() > 1e-4
    assert {v["view"] for v in json.loads((tmp_path / "u-explained" / "explain.json").read_text())["studies"][0]
            ["views"]} == {"OTHER"}

    # explain takes the same views; it warns once too.
    code, _, err = run_chx(capsys, "explain", *vm["models"], "--files", *plain, "--views", ",".join(views),
                           "-o", tmp_path / "ex")
    assert code == 0, err
    assert not _warnings(err)
    doc = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert sorted(v["view"] for v in doc["studies"][0]["views"]) == sorted(views)
    code, _, err = run_chx(capsys, "explain", *vm["models"], "--files", *plain, "-o", tmp_path / "ex2")
    assert code == 0 and len(_warnings(err)) == 1
    # a stage-1 model alone does not use views: no warning
    code, _, err = run_chx(capsys, "explain", "--checkpoint", vm["models"][1], "--files", *plain, "-o",
                           tmp_path / "ex3")
    assert code == 0 and not _warnings(err)


def test_a_model_without_view_types_warns_only_where_order_or_choice_depends_on_views(capsys, tmp_path,
                                                                                      view_models, covid_models):
    from chx.pipeline.predict import view_dependence

    vm = view_models
    plain = _copies(vm, tmp_path, ["first.png", "second.png"])
    models = [vm["models"][0], vm["models"][1], "--fusion", covid_models["fusion"]]     # no view embedding
    code, _, err = run_chx(capsys, "predict", *models, "--files", *plain, "-o", tmp_path / "a.csv")
    assert code == 0 and len(_warnings(err)) == 1 and "order of the views" in err   # 2 slots: order matters
    code, _, err = run_chx(capsys, "predict", *models, "--files", plain[0], "-o", tmp_path / "b.csv")
    assert code == 0 and not _warnings(err)                                         # one image: nothing to order
    assert view_dependence({"max_views": 2, "segment_embedding": False}, 2) is None
    assert "choice" in view_dependence({"max_views": 2}, 3)
    assert "experts" in view_dependence({"experts": 3}, 1) and "experts" in view_dependence({"view_experts": True}, 1)


def test_batched_manifest_prediction_equals_one_study_at_a_time(capsys, tmp_path, view_models):
    from chx.engine.predictor import Predictor
    from chx.pipeline.predict import collect_inputs

    vm = view_models
    base = ["predict", *vm["models"], "--manifest", vm["val"], "--images", vm["images"]]
    code, out, err = run_chx(capsys, *base, "--batch-size", "3", "--workers", "0", "-o", tmp_path / "b3.csv")
    assert code == 0, err
    code, _, err = run_chx(capsys, *base, "--batch-size", "64", "--workers", "0", "-o", tmp_path / "b64.csv")
    assert code == 0, err
    b3, b64 = pl.read_csv(tmp_path / "b3.csv"), pl.read_csv(tmp_path / "b64.csv")
    val = read_manifest(vm["val"])
    assert b3["study_id"].to_list() == val["study_id"].unique(maintain_order=True).cast(pl.Utf8).to_list()
    np.testing.assert_allclose(b3.drop("study_id").to_numpy(), b64.drop("study_id").to_numpy(), rtol=0, atol=1e-5)

    predictor = Predictor.load(backbone=vm["models"][1], fusion=vm["models"][3], device="cpu")
    inputs = collect_inputs(manifest=vm["val"], images=vm["images"])
    first = inputs.filter(pl.col("study_id").is_in(inputs["study_id"].unique(maintain_order=True).head(6).implode()))
    for n, ((sid,), g) in enumerate(first.group_by("study_id", maintain_order=True)):
        one = predictor.predict_study(list(g["file"]), g["view"].to_list(), g["image_id"].to_list())
        np.testing.assert_allclose(one, b3.row(n)[1:], rtol=0, atol=1e-5)


def test_predict_split_selects_the_manifest_studies(capsys, tmp_path, view_models, covid_manifest):
    vm = view_models
    base = ["predict", *vm["models"], "--manifest", covid_manifest, "--images", vm["images"], "--workers", "0"]
    code, out, err = run_chx(capsys, *base, "--split", "val", "-o", tmp_path / "v.csv")
    assert code == 0, err
    val = read_manifest(covid_manifest).filter(pl.col("split") == "val")
    assert pl.read_csv(tmp_path / "v.csv").height == val["study_id"].n_unique()
    assert f"{val.height:,} images" in out
    code, _, err = run_chx(capsys, *base, "--split", "nosuch", "-o", tmp_path / "x.csv")
    assert code == 2 and "'nosuch'" in err and "val" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_chx(capsys, "predict", *vm["models"], "--files", vm["images"] / val["path"][0], "--split",
                           "val", "-o", tmp_path / "x.csv")
    assert code == 2 and "--split needs --manifest" in err
    assert not (tmp_path / "x.csv").exists()


def test_weak_inputs_are_one_line(capsys, tmp_path, view_models):
    vm = view_models
    plain = _copies(vm, tmp_path / "in", ["a.png", "b.png"])
    cases = [
        (["--files", tmp_path / "in"], "is a folder: use --studies"),
        (["--files", plain[0], tmp_path / "in"], "is a folder: use --studies"),
        (["--manifest", tmp_path, "--images", vm["images"]], "is a folder: give the manifest file"),
        (["--manifest", vm["tmp"]], f"e.g. {vm['manifest'].parent}"),          # no --images: still the folder
        (["--files", plain[0], plain[0]], "twice"),
        (["--files", plain[0], tmp_path / "in" / ".." / "in" / "a.png"], "twice"),
        (["--files", *plain, "--views", "PA"], "one view per --files file"),
        (["--files", *plain, "--views", "PA,"], "one view per --files file"),
        (["--files", *plain, "--views", "PA,LATERL"], "'LATERL' is not a view"),
        (["--studies", tmp_path, "--views", "PA"], "--views gives the views of --files"),
    ]
    for args, message in cases:
        for command in ("predict", "explain"):
            code, _, err = run_chx(capsys, command, *vm["models"], *args, "-o", tmp_path / "out.csv")
            assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (command, args, err)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_non_utf8_file_names_are_escaped_in_every_output(capsys, tmp_path, view_models):
    vm = view_models
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    names = [os.fsdecode(b"r\xf6ntgen_pa.png"), os.fsdecode(b"r\xf6ntgen_lateral.png")]
    files = _copies(vm, folder, names)
    studies = tmp_path / "studies"
    shutil.copytree(folder, studies / os.fsdecode(b"s\xff1"))
    for args, fmt in (([], "csv"), (["--format", "json"], "json"), (["--format", "cxr-lt"], "csv")):
        out = tmp_path / f"p-{len(args)}-{fmt}.{fmt}"
        code, stdout, err = run_chx(capsys, "predict", *vm["models"], "--files", *files, *args, "-o", out,
                                    "--study-id", os.fsdecode(b"st\xfcdy"), "--overwrite")
        assert code == 0, err
        text = out.read_text(encoding="utf-8")
        assert ("r\\xf6ntgen_pa" if "cxr-lt" in args else "\\xfcdy") in text      # JSON doubles the backslash
    code, _, err = run_chx(capsys, "predict", *vm["models"], "--studies", studies, "-o", tmp_path / "s.csv",
                           "--explain", tmp_path / "s-ex")
    assert code == 0, err
    assert not _warnings(err)                                   # the file names' words gave the views
    assert "s\\xff1" in (tmp_path / "s.csv").read_text(encoding="utf-8")
    index = (tmp_path / "s-ex" / "index.html").read_text(encoding="utf-8")
    assert "s\\xff1" in index
    doc = json.loads((tmp_path / "s-ex" / "explain.json").read_text(encoding="utf-8"))
    assert doc["studies"][0]["views"][0]["image_id"] == "s\\xff1/r\\xf6ntgen_pa"
    code, _, err = run_chx(capsys, "predict", *vm["models"], "--files", folder / os.fsdecode(b"n\xe9"),
                           "-o", tmp_path / "x.csv")
    assert code == 2 and "does not exist" in err and "\\xe9" in err


def test_predict_as_a_process_with_dataloader_workers(tmp_path, view_models):
    vm = view_models
    out = tmp_path / "p.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "chx", "predict", *map(str, vm["models"]), "--manifest", str(vm["val"]),
                        "--images", str(vm["images"]), "--split", "val", "--batch-size", "8", "-o", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert pl.read_csv(out).height == read_manifest(vm["val"])["study_id"].n_unique()
