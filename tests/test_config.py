"""--config FILE: a run folder's config.json repeats the run exactly; YAML files with command-line
overrides; an unknown key (or a file for another command) is one line naming it and the file."""

from __future__ import annotations

import json

import polars as pl
import pytest

from chx.data.manifest import read_manifest, write_manifest
from helpers import run_chx, shared_path


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, covid_manifest):
    """A tiny stage-1 run with many non-default options, through the CLI."""
    tmp = tmp_path_factory.mktemp("config")
    df = read_manifest(covid_manifest)
    small = pl.concat([df.filter(pl.col("split") == "train").head(24), df.filter(pl.col("split") == "val").head(8)])
    write_manifest(small, tmp / "small.parquet")
    images = shared_path("covid-cxr", "images")
    out = tmp / "run1"
    from chx.cli import main   # run_chx needs capsys, which a module fixture cannot have

    main(["train-backbone", "--manifest", str(tmp / "small.parquet"), "--images", str(images), "-o", str(out),
          "--model", "test_convnext", "--size", "32", "--no-pretrained", "--no-balance", "--no-tta",
          "--epochs", "1", "--batch-size", "4", "--lr", "2e-3", "--warmup", "0.2", "--log-every", "1",
          "--val-every", "1", "--seed", "3", "--workers", "0", "--device", "cpu"])
    return {"tmp": tmp, "out": out, "images": images}


def test_run_config_json_repeats_the_run_exactly(capsys, first_run):
    again = first_run["tmp"] / "run2"
    code, _, err = run_chx(capsys, "train-backbone", "--config", first_run["out"] / "config.json", "-o", again)
    assert code == 0, err
    a, b = (json.loads((d / "config.json").read_text()) for d in (first_run["out"], again))
    assert a["train"] == b["train"] and a["options"] == b["options"]
    assert len(losses(again)) == 6 and losses(again) == losses(first_run["out"])


def test_yaml_file_with_command_line_override(capsys, first_run):
    tmp = first_run["tmp"]
    # long option names with dashes or underscores, a list for a repeatable option
    (tmp / "b.yaml").write_text(f"""
manifest: [{tmp / 'small.parquet'}]
images: [{first_run['images']}]
model: test_convnext
size: 32
pretrained: false
balance: false
tta: false
epochs: 1
batch-size: 4
lr: 2.0e-3
warmup: 0.2
log_every: 1
val-every: 1
seed: 3
workers: 0
device: cpu
max-steps: 5
""")
    out = tmp / "run3"
    code, _, err = run_chx(capsys, "train-backbone", "--config", tmp / "b.yaml", "--max-steps", "2", "-o", out)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 2 and cfg["train"]["lr"] == 2e-3 and cfg["options"]["size"] == 32
    assert losses(out) == losses(first_run["out"])[:2]     # the same run, stopped by the command line


def test_unknown_key_and_foreign_run_config_are_one_line(capsys, first_run):
    tmp = first_run["tmp"]
    (tmp / "typo.yaml").write_text("learning_rate: 0.1\n")
    for command in ("train-backbone", "train-fusion", "extract-features", "evaluate"):
        code, _, err = run_chx(capsys, command, "--config", tmp / "typo.yaml")
        assert code == 2 and err.count("\n") == 1, err
        assert "unknown key 'learning_rate'" in err and "typo.yaml" in err and command in err

    # a stage-1 run's config.json is not train-fusion's
    code, _, err = run_chx(capsys, "train-fusion", "--config", first_run["out"] / "config.json")
    assert code == 2 and err.count("\n") == 1 and "backbone run" in err and "train-backbone" in err

    (tmp / "broken.yaml").write_text("epochs: [1\n")
    code, _, err = run_chx(capsys, "train-backbone", "--config", tmp / "broken.yaml")
    assert code == 2 and err.count("\n") == 1 and "not valid YAML" in err and "line" in err
