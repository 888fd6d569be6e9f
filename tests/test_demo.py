"""The synthetic demo data and the `chx demo` pipeline (tiny configuration)."""

from __future__ import annotations

import hashlib

import polars as pl

from chx.data.demo import CLASS_NAMES, FINDINGS, make_demo_data
from chx.data.manifest import read_manifest, summarize
from tests.conftest import run_chx


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_data_is_deterministic_multiview_and_long_tailed(tmp_path):
    a = make_demo_data(tmp_path / "a", studies=200, seed=3, size=64)
    b = make_demo_data(tmp_path / "b", studies=200, seed=3, size=64)
    c = make_demo_data(tmp_path / "c", studies=200, seed=4, size=64)
    assert digest(a.parent) == digest(b.parent) != digest(c.parent)
    df = read_manifest(a)
    assert read_manifest(b).equals(df)
    s = summarize(df)
    views = df.group_by("study_id").agg(pl.col("view").n_unique().alias("v"), pl.len().alias("n"))
    assert s["studies"] == 200 and 0.6 < s["multi_view_studies"] / 200 < 0.95
    assert (views["n"] == 1).any() and (views["n"] == 3).any()
    assert set(df["view"]) == {"PA", "AP", "LATERAL"}
    pos = [s["positives"][f.name] for f in FINDINGS]
    assert pos[0] > 3 * pos[-1]                      # long tail: head far above the tail
    assert list(df.columns[6:]) == list(CLASS_NAMES)
    assert {f.visible_in for f in FINDINGS} == {"both", "frontal", "lateral"}


def test_chx_demo_runs_end_to_end_and_prints_the_table(capsys, tmp_path):
    code, out, err = run_chx(capsys, "demo", "--out", tmp_path / "demo", "--studies", "60", "--size", "64",
                             "--model", "test_convnext", "--backbone-epochs", "1", "--fusion-epochs", "1",
                             "--workers", "0")
    assert code == 0, err
    assert "| stage-1 mean |" in out and "| stage-1 max |" in out and "| fusion |" in out
    assert "mAP by where a finding is visible" in out and "lateral only" in out
    assert (tmp_path / "demo" / "fusion" / "best.pt").exists()
