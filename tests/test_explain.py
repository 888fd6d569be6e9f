"""`chx explain`: maps mapped back through the letterbox to the file's pixels, per-view shares, the
probabilities of `chx predict`, the pointing game's arithmetic, the output folder, and the gallery
in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from chx.data.images import load_image, read_image
from chx.data.manifest import read_manifest, write_manifest
from chx.data.transforms import Preprocess
from chx.engine.attribution import (Explanation, FusionExplainer, ImageExplainer, ViewMap, grad_cam,
                                map_to_image, placement, score_explanation, summarise_scores, token_centre)
from chx.engine.predictor import Predictor
from helpers import run_chx, shared_path


@pytest.mark.parametrize("mode", ["letterbox", "squash"])
@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (50, 50), (33, 71)])
def test_placement_is_where_load_image_puts_the_image(tmp_path, shape, mode):
    Image.fromarray(np.full(shape, 255, np.uint8)).save(tmp_path / "white.png")
    square = load_image(tmp_path / "white.png", 64, mode)[0].numpy()
    rows, cols = np.nonzero(square > 0)
    top, left, new_h, new_w = placement(*shape, Preprocess(64, mode))
    assert (rows.min(), cols.min(), rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()) == \
        (top, left, new_h, new_w)


def test_maps_land_on_the_files_pixels_through_the_letterbox():
    """A 40 x 100 image letterboxed into 64 px: rows 19..45 of the square hold it. The map equals
    upsampling to the square, cropping the padding and resizing; a hot token's peak is its centre."""
    pre, (h, w) = Preprocess(64), (40, 100)
    grid = np.zeros((1, 4, 4), np.float32)
    grid[0, 1, 3] = 1.0                          # square rows 16..32, columns 48..64
    out = map_to_image(grid, h, w, pre)
    assert out.shape == (1, h, w)
    top, left, new_h, new_w = placement(h, w, pre)
    square = F.interpolate(torch.from_numpy(grid)[None], size=(64, 64), mode="bilinear", align_corners=False)
    crop = square[..., top:top + new_h, left:left + new_w]
    two_step = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    assert np.abs(out - two_step).max() < 0.08           # same map; differs only by resampling twice
    x, y = token_centre(1 * 4 + 3, (4, 4), h, w, pre)
    assert (top, new_h) == (19, 26) and (x, y) == pytest.approx((56 * 100 / 64, (24 - 19) * 40 / 26))
    yy, xx = np.unravel_index(np.argmax(out[0]), out[0].shape)
    assert abs(xx - x) <= 100 / 64 * 8 and abs(yy - y) <= 100 / 64 * 8
    assert out[0, :, :50].max() < 0.05                  # the left half of the image got nothing


def _explanation(grids, views=("PA", "LATERAL"), size=(100, 100)):
    img = np.zeros(size, np.float32)
    return Explanation("s1", ["A", "B"], np.array([0.9, 0.2]),
                       [ViewMap(f"s1_{n}", v, f"s1_{n}.png", img, np.asarray(g, np.float32))
                        for n, (v, g) in enumerate(zip(views, grids))], Preprocess(100), "fusion")


def test_pointing_game_and_view_shares_on_known_maps():
    """Two 100 px views (frontal, lateral), 2 x 2 tokens of 50 px, boxes grown by one token.
    Class A: 0.7 of its attention on the lateral view's bottom-right token, where its sign is drawn:
    the study peak hits; the frontal view's own peak (top-left) is 55 px from the frontal box: a miss.
    Class B: the study peak is on the lateral view, which does not show B's sign: a miss wherever
    it lies; within the frontal view the peak is on the sign."""
    frontal = [[[0.2, 0.0], [0.0, 0.1]], [[0.4, 0.0], [0.0, 0.0]]]
    lateral = [[[0.0, 0.0], [0.0, 0.7]], [[0.0, 0.0], [0.0, 0.6]]]
    expl = _explanation([frontal, lateral])
    np.testing.assert_allclose(expl.shares().sum(0), [1.0, 1.0])
    assert expl.study_peak(0) == (1, 75.0, 75.0) and expl.peak(0, 0) == (25.0, 25.0)
    boxes = {("s1_1", "A"): (60.0, 60.0, 80.0, 80.0), ("s1_0", "A"): (80.0, 80.0, 90.0, 90.0)}
    (rec,) = score_explanation(expl, ["A"], boxes)
    assert rec["share"] == pytest.approx({"frontal": 0.3, "lateral": 0.7}) and rec["both_types"]
    assert rec["hit"] is True and rec["view_hits"] == [False, True]
    # grown boxes clipped to the image: 30..100 (70 x 70) on the frontal, 10..100 (90 x 90) on the lateral
    assert rec["view_chances"] == pytest.approx([0.49, 0.81])
    assert rec["chance"] == pytest.approx((4900 + 8100) / 20000)
    (rec_b,) = score_explanation(expl, ["B"], {("s1_0", "B"): (0.0, 0.0, 10.0, 10.0)})
    assert rec_b["hit"] is False and rec_b["view_hits"] == [True] and rec_b["view_chances"] == [0.36]
    summary = summarise_scores([rec, rec_b], {"A": "lateral", "B": "frontal"})
    assert summary["attribution"]["lateral-only findings"] == {
        "studies": 1, "lateral share": pytest.approx(0.7), "frontal share": pytest.approx(0.3)}
    assert summary["attribution"]["frontal-only findings"]["frontal share"] == pytest.approx(0.4)
    assert rec["box_chance"] == pytest.approx((100 + 400) / 20000) and rec_b["box_chance"] == 100 / 20000
    assert summary["pointing"] == {"pairs": 2, "hit rate": 0.5, "chance": pytest.approx((0.65 + 0.18) / 2),
                                   "box chance": pytest.approx((0.025 + 0.005) / 2)}
    assert summary["pointing_in_view"] == {"pairs": 3, "hit rate": pytest.approx(2 / 3),
                                           "chance": pytest.approx((0.49 + 0.81 + 0.36) / 3)}
    (rec_c,) = score_explanation(expl, ["B"], {})          # no view shows the sign: not in the game
    assert rec_c["hit"] is None


@pytest.fixture(scope="module")
def covid_study(covid_manifest):
    """The covid validation split, and one of its studies with two views of different sizes."""
    val = read_manifest(covid_manifest).filter(pl.col("split") == "val")
    multi = val.group_by("study_id", maintain_order=True).agg(pl.len().alias("n")).filter(pl.col("n") >= 2)
    rows = val.filter(pl.col("study_id") == multi["study_id"][0])
    files = [shared_path("covid-cxr", "images") / p for p in rows["path"]]
    return val, rows, files


def test_fusion_explanation_has_predicts_probabilities_and_one_attention_budget(covid_models, covid_backbone,
                                                                                 covid_study):
    _, rows, files = covid_study
    predictor = Predictor.load(backbone=covid_backbone, fusion=covid_models["fusion"], device="cpu")
    assert predictor.flip_tta                                 # the store has flipped maps: TTA is on
    views, ids = rows["view"].to_list(), rows["image_id"].to_list()
    expl = FusionExplainer(predictor).explain_study("s", files, views, ids)
    np.testing.assert_allclose(expl.probs, predictor.predict_study(files, views, ids), rtol=0, atol=1e-6)
    np.testing.assert_allclose(expl.shares().sum(0), 1.0, atol=1e-5)
    for n, v in enumerate(expl.views):
        assert (v.height, v.width) == read_image(v.file).shape and v.height != v.width
        assert expl.heatmaps(n, [0, 2]).shape == (2, v.height, v.width)
        x, y = expl.peak(n, 0)
        assert 0 <= x < v.width and 0 <= y < v.height


def test_grad_cam_is_the_gradient_weighted_map_and_independent_of_batch_mates(covid_backbone):
    explainer = ImageExplainer.load(covid_backbone, device="cpu", method="grad-cam")
    model = explainer.net
    torch.manual_seed(0)
    x = torch.randn(3, 1, 64, 64)
    logits, cams = grad_cam(model, x)
    fmap = model.forward_features(x[1:2]).detach().requires_grad_(True)
    model.forward_head(fmap)[0, 2].backward()
    want = torch.relu((fmap.grad.mean((2, 3), keepdim=True) * fmap).sum(1))[0]
    torch.testing.assert_close(cams[1, 2], want.detach())
    assert cams.shape == (3, logits.shape[1], *fmap.shape[-2:]) and (cams >= 0).all()
    torch.testing.assert_close(logits, model(x).detach())


@pytest.fixture(scope="module")
def explained(tmp_path_factory, covid_models, covid_backbone, covid_manifest, covid_study):
    """`chx explain` on three covid validation studies (run once for the module)."""
    import contextlib
    import io

    from chx.cli import main

    tmp = tmp_path_factory.mktemp("explain")
    val, _, _ = covid_study
    first = val["study_id"].unique(maintain_order=True).head(3)
    write_manifest(val.filter(pl.col("study_id").is_in(first.implode())), tmp / "val3.parquet")
    out = tmp / "ex"
    args = ["explain", "--backbone", covid_backbone, "--fusion", covid_models["fusion"], "--manifest",
            covid_manifest, "--images", shared_path("covid-cxr", "images"), "--split", "val", "--limit", "3",
            "--top-k", "2", "-o", out]
    with contextlib.redirect_stdout(io.StringIO()):
        main([str(a) for a in args])
    return {"out": out, "doc": json.loads((out / "explain.json").read_text()), "args": args,
            "val3": tmp / "val3.parquet", "tmp": tmp}


def test_chx_explain_writes_a_figure_per_study_and_the_numbers(explained):
    out, doc = explained["out"], explained["doc"]
    assert doc["model"] == "fusion" and len(doc["studies"]) == 3
    for s in doc["studies"]:
        assert (out / s["figure"]).is_file()
        fig = Image.open(out / s["figure"])
        assert fig.width > 170 + 150 * len(s["views"]) - 1 and fig.height > 2 * 160
        probs = [f["probability"] for f in s["findings"]]
        assert probs == sorted(probs, reverse=True) and sum(f["shown"] for f in s["findings"]) == 2
        size = {v["image_id"]: (v["width"], v["height"]) for v in s["views"]}
        for f in s["findings"]:
            assert sum(v["share"] for v in f["views"]) == pytest.approx(1.0, abs=1e-3)
            for p in [f["peak"], *[{**v["peak"], "image_id": v["image_id"]} for v in f["views"]]]:
                w, h = size[p["image_id"]]
                assert 0 <= p["x"] < w and 0 <= p["y"] < h
    html = (out / "index.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', html)) == {s["figure"] for s in doc["studies"]}
    assert "http" not in html                              # offline: nothing outside the folder
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ex")]   # no temp folder left


def test_explain_refuses_mistakes_with_one_line(capsys, explained):
    args = explained["args"]
    code, _, err = run_chx(capsys, *args)                                    # -o exists
    assert code == 2 and "exists" in err and "--overwrite" in err
    bad = [a for a in args if a != explained["out"]][:-1] + ["-o", explained["tmp"] / "x"]
    code, _, err = run_chx(capsys, *bad, "--classes", "COVID-19,Nope")
    assert code == 2 and "'Nope'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_chx(capsys, *bad, "--method", "grad-cam")
    assert code == 2 and "--checkpoint" in err
    code, _, err = run_chx(capsys, *bad, "--split", "nosuch")
    assert code == 2 and "nosuch" in err
    assert not (explained["tmp"] / "x").exists()


def test_stage1_maps_of_single_images_and_predict_explain(capsys, explained, covid_backbone, covid_models,
                                                          covid_study):
    _, rows, files = covid_study
    out = explained["tmp"] / "one"
    code, _, err = run_chx(capsys, "explain", "--checkpoint", covid_backbone, "--files", *files, "-o", out,
                           "--method", "grad-cam")
    assert code == 0, err
    (study,) = json.loads((out / "explain.json").read_text())["studies"]
    assert len(study["views"]) == 2 and (out / study["figure"]).is_file()
    top = study["findings"][0]
    assert top["probability"] == max(v["probability"] for v in top["views"])    # ranked by the max image
    code, _, err = run_chx(capsys, "predict", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                           "--manifest", explained["val3"], "--images", shared_path("covid-cxr", "images"),
                           "-o", explained["tmp"] / "p.csv", "--explain", explained["tmp"] / "pex")
    assert code == 0, err
    doc = json.loads((explained["tmp"] / "pex" / "explain.json").read_text())
    pred = pl.read_csv(explained["tmp"] / "p.csv")
    assert len(doc["studies"]) == pred.height == 3
    assert [s["study_id"] for s in doc["studies"]] == [s["study_id"] for s in explained["doc"]["studies"]]
    first = doc["studies"][0]
    row = pred.filter(pl.col("study_id") == first["study_id"]).row(0, named=True)
    for f in first["findings"]:
        assert f["probability"] == pytest.approx(row[f["class"]], abs=1e-4)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless browser installed (Debian: apt-get install chromium)")


def _dump_dom(browser: str, page) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
           "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def test_gallery_loads_every_figure_in_headless_chromium(explained, tmp_path):
    browser = _chromium()
    gallery = tmp_path / "ex"
    shutil.copytree(explained["out"], gallery)
    dom = _dump_dom(browser, gallery / "index.html")
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == 3 and all('data-loaded="yes"' in i for i in imgs), imgs
    # the check sees a broken link: remove one figure
    missing = explained["doc"]["studies"][1]["figure"]
    (gallery / missing).unlink()
    imgs = re.findall(r"<img [^>]*>", _dump_dom(browser, gallery / "index.html"))
    assert [('data-loaded="no"' in i) for i in imgs] == [False, True, False]
