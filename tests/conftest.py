"""Shared fixtures.

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


@pytest.fixture
def shared_data() -> Path:
    return shared_path()
