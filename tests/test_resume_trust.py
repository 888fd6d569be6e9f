"""--resume trusts nothing on disk (issue 26, items 7, 8, 10): a run resumes only on the inputs it
started with (manifest sha256, store fingerprint and data, starting weights), best.pt and last.pt
stay consistent through a disk full, an unwritable metrics.jsonl is one line, and a symlink loop
under --images is walked once instead of forever."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from chx.data.manifest import class_columns, read_manifest, write_manifest
from chx.data.samplers import ShuffleSampler
from chx.engine.run_folder import RunFolder
from chx.engine.trainer import fit
from chx.errors import ChxError
from chx.models import load_checkpoint
from chx.options import TrainConfig
from helpers import TINY, one_line, run_chx, shared_path


# ------------------------------------------------------------------ toy runs (no images)

class Toy(Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, :2] > 0).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        i, _seed = item
        return {"image": self.x[i], "target": self.y[i]}


def toy_loss(model, batch, device):
    return nn.functional.binary_cross_entropy_with_logits(model(batch["image"]), batch["target"])


META = {"kind": "backbone", "model_config": {"toy": 1}, "class_names": ["a", "b"]}


def toy_run(out, evaluate, **kw):
    """32 items, batch 8: 4 steps, a validation after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, workers=0, log_every=1, val_every=0.25,
                      device="cpu", **{k: kw.pop(k) for k in list(kw) if k in ("max_steps",)})
    data = Toy()
    return fit(model, data, ShuffleSampler(len(data), seed=0), toy_loss, evaluate, cfg, out, META, **kw)


def rising():
    """An evaluate whose score rises at every call: every validation is a new best."""
    calls = []

    def evaluate(model):
        calls.append(1)
        return {"mAP": 0.1 * len(calls)}
    return evaluate


def consistent(out: Path) -> dict:
    """last.pt's best score is best.pt's, and best.pt exists whenever last.pt records a best."""
    last = load_checkpoint(out / "last.pt")
    if last["best_metric"] is None:
        return last
    assert (out / "best.pt").exists(), "last.pt records a best score but best.pt is missing"
    best = load_checkpoint(out / "best.pt")
    assert best["metrics"]["mAP"] == pytest.approx(last["best_metric"])
    assert best["step"] <= last["step"]
    return last


def fail_on(monkeypatch, name: str, after: int = 0):
    """torch.save raises ENOSPC when writing ``name`` (through its atomic temp file) for the
    (after+1)-th time and later."""
    real, seen = torch.save, []

    def save(obj, f, *a, **kw):
        target = Path(getattr(f, "name", str(f))).name
        if target.startswith(f".{name}."):
            seen.append(target)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("name, after", [("best.pt", 0), ("best.pt", 1), ("last.pt", 1)])
def test_disk_full_while_saving_leaves_best_and_last_consistent(tmp_path, monkeypatch, name, after):
    out = tmp_path / "r"
    evaluate = rising()
    with monkeypatch.context() as m:
        fail_on(m, name, after)
        with pytest.raises(ChxError, match=f"could not write .*{name}: No space left on device"):
            toy_run(out, evaluate)
    assert not list(out.glob(".*.tmp"))                         # no temp file left behind
    if not (out / "last.pt").exists():                          # the very first save failed
        assert not (out / "best.pt").exists()
        toy_run(out, rising())                                  # a fresh start is allowed
    else:   # last.pt's best is on disk (best.pt may be newer: it is written first)
        last, best = (load_checkpoint(out / f) for f in ("last.pt", "best.pt"))
        assert best["metrics"]["mAP"] >= last["best_metric"] and best["step"] >= last["step"]
        toy_run(out, evaluate, resume=True)                     # space freed: resume
    last = consistent(out)
    assert last["step"] == 4 and (out / "best.pt").exists()


def test_resume_recreates_a_missing_best_checkpoint(tmp_path, capsys):
    """The state an older chx left after a disk full (or best.pt deleted): last.pt records a best
    that is not on disk. Resume says so and writes best.pt again, so the run ends consistent."""
    out = tmp_path / "r"
    toy_run(out, rising(), max_steps=2)
    (out / "best.pt").unlink()
    capsys.readouterr()
    toy_run(out, rising(), resume=True)
    err = capsys.readouterr().err
    assert "best.pt is missing though" in err and "last.pt records a best score" in err
    last = consistent(out)
    assert last["step"] == 4


def test_unwritable_metrics_on_resume_is_one_line(tmp_path):
    out = tmp_path / "r"
    toy_run(out, rising(), max_steps=2)
    before = (out / "last.pt").read_bytes()
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()                             # unwritable as a file, even for root
    with pytest.raises(ChxError, match=r"cannot write .*metrics.jsonl: Is a directory; make it writable"):
        toy_run(out, rising(), resume=True)
    assert (out / "last.pt").read_bytes() == before             # nothing trained, nothing replaced
    rf = RunFolder(out)                                         # fails while training: the same line
    with pytest.raises(ChxError, match=r"cannot write .*metrics.jsonl: .*continue with --resume"):
        rf.log({"kind": "train", "step": 1})
    if os.geteuid() != 0:                                       # read-only (chattr +i is root's)
        (out / "metrics.jsonl").rmdir()
        (out / "metrics.jsonl").write_text("")
        (out / "metrics.jsonl").chmod(0o444)
        with pytest.raises(ChxError, match="cannot write .*metrics.jsonl"):
            toy_run(out, rising(), resume=True)


# ------------------------------------------------------------------ changed inputs (real data)

@pytest.fixture(scope="module")
def small(tmp_path_factory, covid_manifest):
    """24 training and 8 validation images of covid, and the same rows with train and val swapped."""
    tmp = tmp_path_factory.mktemp("resume-inputs")
    df = read_manifest(covid_manifest)
    df = pl.concat([df.filter(pl.col("split") == "train").head(24), df.filter(pl.col("split") == "val").head(8)])
    write_manifest(df, tmp / "m.parquet")
    swapped = df.with_columns(pl.when(pl.col("split") == "train").then(pl.lit("val"))
                              .otherwise(pl.lit("train")).alias("split"))
    write_manifest(swapped, tmp / "swapped.parquet")
    return {"tmp": tmp, "df": df, "swapped": tmp / "swapped.parquet", "images": shared_path("covid-cxr", "images")}


def _replace(target: Path, source: Path) -> None:
    target.write_bytes(source.read_bytes())      # same name, other contents


def test_resume_backbone_with_changed_manifest_is_refused(capsys, tmp_path, small):
    manifest = tmp_path / "m.parquet"
    shutil.copy(small["tmp"] / "m.parquet", manifest)
    args = ["train-backbone", "--manifest", manifest, "--images", small["images"], *TINY, "--batch-size", "8",
            "--epochs", "1", "--max-steps", "1", "--device", "cpu", "-o", tmp_path / "r"]
    assert run_chx(capsys, *args)[0] == 0
    config = (tmp_path / "r" / "config.json").read_text()
    last = (tmp_path / "r" / "last.pt").read_bytes()
    original = manifest.read_bytes()

    _replace(manifest, small["swapped"])                         # train and val swapped
    code, _, err = run_chx(capsys, *args, "--resume")
    one_line(code, err, f"manifest {manifest} changed since the run started (sha256 ")
    assert "trained on other inputs" in err
    assert (tmp_path / "r" / "config.json").read_text() == config   # still records what it trained on
    assert (tmp_path / "r" / "last.pt").read_bytes() == last

    c = class_columns(small["df"])[0]                            # one label changed, splits the same
    flipped = pl.when(pl.int_range(pl.len()) == 0).then(1 - pl.col(c).fill_null(0)).otherwise(pl.col(c))
    write_manifest(small["df"].with_columns(flipped.cast(small["df"][c].dtype).alias(c)), manifest)
    code, _, err = run_chx(capsys, *args, "--resume")
    one_line(code, err, "changed since the run started")

    manifest.write_bytes(original)                               # the same bytes again: resumes
    code, _, err = run_chx(capsys, *args, "--resume", "--max-steps", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["max_steps"] == 2


def test_resume_joint_with_changed_manifest_is_refused(capsys, tmp_path, small, covid_backbone):
    manifest = tmp_path / "m.parquet"
    shutil.copy(small["tmp"] / "m.parquet", manifest)
    args = ["train-joint", "--manifest", manifest, "--images", small["images"], "--backbone", covid_backbone,
            "--batch-size", "4", "--epochs", "1", "--max-steps", "1", "--workers", "0", "--device", "cpu",
            "-o", tmp_path / "j"]
    code, _, err = run_chx(capsys, *args)
    assert code == 0, err
    _replace(manifest, small["swapped"])
    code, _, err = run_chx(capsys, *args, "--resume")
    one_line(code, err, f"manifest {manifest} changed since the run started")


def test_resume_fusion_on_a_store_of_other_data_is_refused(capsys, tmp_path, small, covid_backbone):
    from chx.pipeline.extract import extract_features

    store = str(tmp_path / "s.zarr")
    extract_features(covid_backbone, small["tmp"] / "m.parquet", small["images"], store, workers=0,
                     echo=lambda *a: None)
    args = ["train-fusion", "--store", store, "--dim", "16", "--heads", "2", "--ffn-dim", "16", "--batch-size",
            "4", "--epochs", "1", "--max-steps", "1", "--workers", "0", "--device", "cpu", "-o", tmp_path / "f"]
    code, _, err = run_chx(capsys, *args)
    assert code == 0, err
    # extracted again, same backbone and options (the same fingerprint), from the swapped manifest
    extract_features(covid_backbone, small["swapped"], small["images"], store, workers=0, overwrite=True,
                     echo=lambda *a: None)
    code, _, err = run_chx(capsys, *args, "--resume")
    one_line(code, err, "the store holds other images, splits or labels (data sha256 ")
    # ... and with flipped maps added: the features were made otherwise
    extract_features(covid_backbone, small["tmp"] / "m.parquet", small["images"], store, workers=0, flip=True,
                     overwrite=True, echo=lambda *a: None)
    code, _, err = run_chx(capsys, *args, "--resume")
    one_line(code, err, "the store's features were made otherwise (flip False -> True)")


def test_require_same_inputs_compares_contents_not_names():
    from chx.engine.compat import require_same_inputs

    a, b = "a" * 64, "b" * 64
    require_same_inputs({"manifest_sha256": {"x.parquet": a}}, {"manifest_sha256": {"./x.parquet": a}}, "r")
    require_same_inputs({}, {"manifest_sha256": {"x.parquet": b}}, "r")        # an older run: not compared
    with pytest.raises(ChxError, match="manifest x.parquet changed since the run started "
                                       r"\(sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb\)"):
        require_same_inputs({"manifest_sha256": {"x.parquet": a}}, {"manifest_sha256": {"x.parquet": b}}, "r")
    with pytest.raises(ChxError, match="the --backbone checkpoint's weights changed"):
        require_same_inputs({"initialised_from": {"backbone_sha256": a, "fusion_sha256": None}},
                            {"initialised_from": {"backbone_sha256": b, "fusion_sha256": None}}, "r")


# ------------------------------------------------------------------ symlink loops under --images

def _with_alarm(seconds, fn, *args):
    def hang(*_):
        raise TimeoutError(f"still walking after {seconds} s: a symlink loop is followed")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_symlink_loops_are_walked_once(tmp_path):
    from chx.data.adapters.common import list_images

    root = tmp_path / "root"
    (root / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    for p in ("x.png", "sub/y.png", "sub/deep/z.png"):
        (root / p).touch()
    (tmp_path / "outside" / "o.png").touch()
    (tmp_path / "beside.png").touch()
    for name, target in [("a", "."), ("b", "."), ("sub/up", ".."), ("sub/deep/top", "../.."),
                         ("parent", ".."), ("grand", "../.."), ("slash", "/"), ("alias", "sub"), ("out", "../outside"),
                         ("dangling", "nowhere")]:
        (root / name).symlink_to(target)
    rels = _with_alarm(20, list_images, root)["rel"].to_list()
    assert sorted(rels) == ["dangling", "out/o.png", "sub/deep/z.png", "sub/y.png", "x.png"]


def test_prepare_with_a_symlink_loop_under_images_finds_every_image(tmp_path, covid_manifest):
    """`a -> .` beside the images (and a link to the parent): prepare ends, and finds each image once
    (the loop's copies once made every name ambiguous: "none of the 391 images was found")."""
    from chx.pipeline.prepare import prepare

    root = tmp_path / "root"
    root.mkdir()
    (root / "images").symlink_to(shared_path("covid-cxr", "images"))
    (root / "a").symlink_to(".")
    (root / "images-again").symlink_to("images")
    (root / "up").symlink_to("..")
    out = tmp_path / "m.parquet"
    _with_alarm(60, lambda: prepare("covid", [shared_path("covid-cxr", "metadata.csv")], out, images=root,
                                    val_fraction=0.25, seed=0))
    got, want = read_manifest(out), read_manifest(covid_manifest)
    assert got.height == want.height
    assert got["path"].str.starts_with("images/").all()


def test_a_newer_best_checkpoint_is_not_replaced_by_a_worse_replay(tmp_path, monkeypatch):
    """Stopped between the saves: best.pt (0.2) is newer than last.pt (best 0.1). The resumed run
    replays the step and scores 0.15: best.pt keeps the 0.2 model and last.pt records 0.2."""
    out = tmp_path / "r"
    with monkeypatch.context() as m:
        fail_on(m, "last.pt", after=1)
        with pytest.raises(ChxError, match="No space left on device"):
            toy_run(out, rising())
    kept = load_checkpoint(out / "best.pt")
    toy_run(out, lambda model: {"mAP": 0.15}, resume=True)
    last = consistent(out)
    assert last["best_metric"] == pytest.approx(0.2) and last["step"] == 4
    assert load_checkpoint(out / "best.pt")["step"] == kept["step"]
