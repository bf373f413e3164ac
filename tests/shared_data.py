"""The real data beside the repository (``../shared/data``): a fresh clone has none, the recipes' defaults are
embedded, and the tests that read it skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mpirun import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """``../shared/data/<name>``; where it is absent, the calling test is skipped with the path it needs."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs {path}: real data, kept outside the repository")
    return path
