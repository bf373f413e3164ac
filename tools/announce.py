"""Tests that change the host say so when they run, also under ``pytest -q``."""

from __future__ import annotations

import pytest


def announce(request: pytest.FixtureRequest, message: str) -> None:
    """Print ``message`` on pytest's console now, past output capturing."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"[{request.node.nodeid}] {message}")
