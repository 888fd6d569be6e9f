"""Cluster launchers: `extract-features --shard auto` from SLURM array variables or torchrun's."""

from __future__ import annotations

import pytest

from chx.errors import ChxError
from chx.pipeline.extract import parse_shard


@pytest.mark.parametrize("env,expect", [
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (0, 4)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),                    # no MIN: from 0
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (7, 8)),  # --array=1-8
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "2"}, (3, 4)),                                                 # --array=0-7:2
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "5", "WORLD_SIZE": "9"}, (1, 2)),  # SLURM first
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),                                               # torchrun
    ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1)),
])
def test_shard_auto(env, expect):
    assert parse_shard("auto", env) == expect
    assert parse_shard("AUTO", env) == expect


@pytest.mark.parametrize("env,words", [
    ({}, ["neither a SLURM array task", "--shard i/n"]),
    ({"RANK": "1"}, ["neither a SLURM array task"]),                                          # half of torchrun's
    ({"SLURM_ARRAY_TASK_ID": "2"}, ["SLURM_ARRAY_TASK_COUNT is not"]),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, ["not a whole number"]),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, ["not one of 3"]),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"}, ["not one of 4"]),
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["not in 0..WORLD_SIZE-1"]),
])
def test_shard_auto_errors_are_one_line(env, words):
    with pytest.raises(ChxError) as e:
        parse_shard("auto", env)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_shard_auto_in_the_cli_without_a_launcher(capsys, monkeypatch, tmp_path):
    """The CLI: one line, exit 2, before any model or store is touched."""
    from helpers import run_chx

    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,study_id,path,view,split\n")
    code, out, err = run_chx(capsys, "extract-features", "--checkpoint", tmp_path / "none.pt", "--manifest", manifest,
                             "--images", tmp_path, "--store", tmp_path / "f.zarr", "--shard", "auto")
    assert code == 2 and "--shard auto" in err and "Traceback" not in err, out + err
