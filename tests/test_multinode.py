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


# --- Multi-node torchrun on one machine (issue 31 item 2): two node agents, c10d rendezvous on 127.0.0.1 ---

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_nodes(nodes: int, nproc: int, *chx_args, timeout: float = 240, start=None) -> list[str]:
    """Start `nodes` torchrun agents at once (each its own process group), `--nproc_per_node nproc`,
    c10d rendezvous on 127.0.0.1 and gloo on the loopback; wait for all of them with a deadline. On a
    failure or a timeout every group is killed; afterwards no process of any group may remain.
    ``start``: the node ranks to start (default all)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(r),
         "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", f"chx-test-{port}", "--rdzv_conf", "join_timeout=120", "--local_addr", "127.0.0.1",
         "--max_restarts", "0", "--monitor_interval", "0.5", "-m", "chx", *map(str, chx_args)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for r in (range(nodes) if start is None else start)]
    def group_alive(pgid: int, wait: float = 2.0) -> bool:
        for _ in range(int(wait / 0.1)):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return False
            time.sleep(0.1)
        return True

    outputs, deadline, stray = [], time.monotonic() + timeout, []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
            assert p.returncode == 0, f"node agent exit {p.returncode}:\n{out[-3000:]}"
        stray = [p.pid for p in procs if group_alive(p.pid)]   # a clean run leaves no worker behind
    finally:
        for p in procs:                                   # the agents and their workers: nothing left behind
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            if p.poll() is None:
                p.kill()
            p.communicate()
        for p in procs:
            assert not group_alive(p.pid), f"processes of node agent {p.pid} remain after SIGKILL"
    assert not stray, f"the node agents exited but processes of their groups {stray} remained"
    return outputs


def test_two_node_agents_train_and_extract_like_one_node(tmp_path, nih_manifest, covid_backbone, covid_manifest,
                                                         covid_reference_store):
    """`torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1 --rdzv_backend c10d` on one machine: two
    node agents train stage 1 for a few steps with the same losses as one node with 2 processes (same
    world size 2, same global batch), then extract features into one store that equals the
    single-process extraction byte for byte (RANK/WORLD_SIZE, not LOCAL_RANK, choose the shards), the
    nodes reading an image cache and the single process the original files."""
    import json
    import re

    import numpy as np

    from chx.store import open_store
    from helpers import TINY, shared_path

    def train(out, nodes, nproc):
        _torchrun_nodes(nodes, nproc, "train-backbone", "--manifest", nih_manifest,
                        "--images", shared_path("nih-64px", "images"), *TINY, "--batch-size", "4",
                        "--max-steps", "3", "--log-every", "1", "--val-every", "1000", "--device", "cpu", "-o", out)
        assert json.loads((out / "config.json").read_text())["world_size"] == 2
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]

    two_nodes = train(tmp_path / "nodes", 2, 1)
    assert len(two_nodes) == 3                                   # written once (by rank 0), not once per node
    assert two_nodes == train(tmp_path / "one-node", 1, 2)

    # the two nodes read an image cache (`chx cache-images`), the reference the files: the same store
    from chx.options import CacheImagesOptions
    from chx.pipeline.cache_images import cache_images

    cache = tmp_path / "covid-images.zarr"
    cache_images(CacheImagesOptions(manifest=covid_manifest, out=str(cache), checkpoint=covid_backbone, workers=0),
                 shared_path("covid-cxr", "images"), echo=lambda *a: None)
    store = tmp_path / "f.zarr"
    outputs = _torchrun_nodes(2, 1, "extract-features", "--checkpoint", covid_backbone, "--manifest", covid_manifest,
                    "--images-cache", cache, "--store", store, "--workers", "0",
                    "--batch-size", "8", "--shard-images", "8", "--device", "cpu")
    wrote = [int(m) for out in outputs for m in re.findall(r"wrote ([\d,]+) images", out.replace(",", ""))]
    assert len(wrote) == 2 and all(0 < n < 391 for n in wrote) and sum(wrote) == 391, outputs  # both nodes wrote
    with open_store(store) as got, open_store(covid_reference_store) as ref:
        assert got.complete and got.image_ids == ref.image_ids
        assert all(np.array_equal(got.read_image(r), ref.read_image(r)) for r in range(ref.n_images))

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(store) == files(covid_reference_store)          # the same store, byte for byte


def test_a_node_agent_whose_partner_never_comes_is_stopped_with_its_group(tmp_path, nih_manifest):
    """The harness itself never hangs: node 0 of 2 waits in the rendezvous for a node that never
    starts; at the deadline its process group is killed and nothing of it remains."""
    import subprocess

    from helpers import TINY, shared_path

    with pytest.raises(subprocess.TimeoutExpired):
        _torchrun_nodes(2, 1, "train-backbone", "--manifest", nih_manifest, "--images",
                        shared_path("nih-64px", "images"), *TINY, "--max-steps", "1", "--device", "cpu",
                        "-o", tmp_path / "b", timeout=6, start=[0])
    assert not (tmp_path / "b" / "last.pt").exists()
