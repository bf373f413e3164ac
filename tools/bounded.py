"""Commands bounded by a timeout: nothing a test or a benchmark starts may outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Sequence


def run_bounded(
    argv: Sequence[str],
    timeout: float,
    *,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    what: str | None = None,
    on_timeout: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``argv`` in a process group of its own, output captured as text. Past ``timeout`` seconds the whole
    group is killed (a launcher and every process it started), ``on_timeout`` runs, and an ``AssertionError`` says
    which command (``what``, default the command line) did not finish, with what it printed so far."""
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if on_timeout is not None:
            on_timeout()
        raise AssertionError(
            f"{what or ' '.join(argv)} did not finish within {timeout} s\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        ) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
