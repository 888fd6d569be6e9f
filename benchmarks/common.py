"""Shared set-up of the benchmarks: demo data and a backbone checkpoint (random weights: speed and
size do not depend on the weights), created once in a work folder."""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
from pathlib import Path

import torch

from chx.data.demo import CLASS_NAMES, make_demo_data
from chx.data.transforms import Preprocess
from chx.models.backbone import ImageClassifier
from chx.models import save_checkpoint


def demo_data(work: Path, studies: int, size: int) -> Path:
    manifest = work / f"demo-{studies}-{size}" / "manifest.parquet"
    if not manifest.exists():
        make_demo_data(manifest.parent, studies=studies, size=size, seed=0)
    return manifest


def backbone_checkpoint(work: Path, model: str, size: int) -> Path:
    path = work / f"backbone-{model}-{size}.pt"
    if not path.exists():
        torch.manual_seed(0)
        net = ImageClassifier(model, num_classes=len(CLASS_NAMES))
        save_checkpoint({"kind": "backbone", "model_config": net.config, "state_dict": net.state_dict(),
                         "class_names": list(CLASS_NAMES), "preprocess": Preprocess(size).to_dict(),
                         "train_counts": [1] * len(CLASS_NAMES), "tta": False}, path)
    return path


def write_results(out: Path | None, record: dict, md: str, indent: int = 2) -> None:
    """OUT.json (the record) and OUT.md (its table), when ``out`` is given."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(record, indent=indent))
        out.with_suffix(".md").write_text(md)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs):
    return statistics.median(xs)


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A local S3 server for the duration of the block: moto's server mode on 127.0.0.1 on a free
    port, with the environment of tests/test_s3.py's ``s3`` fixture (AWS_* pointing every client at
    it and nothing else), and ``bucket`` created. Unlike the fixture (a thread of the test process),
    the server runs in its own process, so that the client measured does not share its interpreter
    lock with the server. Yields an s3fs filesystem."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                                             "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the moto S3 server did not start (pip install 'moto[server]')") from None
                time.sleep(0.05)
        for k in saved:
            os.environ.pop(k, None)
        os.environ.update(env)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(bucket)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
