"""`pip install .` gives a working chx, not only the editable install the suite runs on: build the
real wheel, install it into a fresh virtualenv (offline: --no-deps --no-index, the dependencies
come from the test environment), and run the CLI from it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from helpers import ROOT


def run(*cmd, cwd, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_built_wheel_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    # --no-build-isolation: build with this environment's setuptools, no download
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", dist, ROOT, cwd=tmp_path)
    wheel = next(dist.glob("chx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    assert {"chx", "chx/models", "chx/engine", "chx/pipeline", "chx/store", "chx/data",
            "chx/data/adapters"} <= packages

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # The fresh environment sees the test environment's packages (torch, timm, ...) through a
    # path entry; a plain path entry does not run that environment's .pth files, so the editable
    # chx of the test environment stays invisible.
    fresh_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                          cwd=tmp_path).strip())
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel,
        cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = run(python, "-c", "import chx, chx.models, chx.pipeline.train_backbone; print(chx.__file__)",
                cwd=tmp_path, env=env)
    assert str(env_dir) in where and str(ROOT) not in where
    chx = env_dir / "bin" / "chx"
    assert "train-backbone" in run(chx, "--help", cwd=tmp_path, env=env)
    run(chx, "make-demo-data", tmp_path / "demo", "--studies", "10", "--size", "32", cwd=tmp_path, env=env)
    assert (tmp_path / "demo" / "manifest.parquet").is_file()
