"""Helpers for the tests (import with `from helpers import ...`; pytest puts tests/ on sys.path).

Real test data lives in ../shared/data relative to the project root. A user's fresh clone has no
../shared: tests that need it skip with a reason, except under CI=true, where its absence fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the test (fails under CI=true) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = (f"real test data {path} is missing (it lives in ../shared/data beside the project; "
                  f"a plain clone does not have it)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " and CI=true requires it")
        pytest.skip(reason)
    return path


def one_line(code: int, err: str, *expected: str) -> None:
    """A user error as the CLI reports it: exit 2, no traceback, one line on stderr besides
    `warning:`/`note:` lines, holding each of ``expected``."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(("warning: ", "note: "))]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for e in expected:
        assert e in lines[0], lines[0]


def run_chx(capsys, *args) -> tuple[int, str, str]:
    """Run the real `chx` entry point in-process; return (exit code, stdout, stderr)."""
    from chx.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TINY = ["--model", "test_convnext", "--size", "64", "--no-pretrained", "--workers", "0"]


def nih_subset(root: Path, nih_manifest: Path, train: int = 30, val: int = 10):
    """A private copy of the first ``train`` + ``val`` real NIH images (for tests that break them)
    and its manifest ``root/ok.parquet``; returns (images folder, manifest table)."""
    import shutil

    import polars as pl

    from chx.data.manifest import read_manifest, write_manifest

    images = root / "images"
    images.mkdir()
    df = read_manifest(nih_manifest)
    df = pl.concat([df.filter(pl.col("split") == "train").head(train),
                    df.filter(pl.col("split") == "val").head(val)])
    for p in df["path"]:
        shutil.copy(shared_path("nih-64px", "images", p), images / p)
    write_manifest(df, root / "ok.parquet")
    return images, df
