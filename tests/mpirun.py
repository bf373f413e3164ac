"""Multi-rank scenarios of the test suite: launched on real MPI ranks (:mod:`tools.mpirun`), results per rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

from tools.mpirun import ROOT, check, launcher, mpi_env, run_mpi, tcp_only

__all__ = ["ROOT", "Launch", "check", "launch_scenario", "launcher", "mpi_env", "run_mpi", "tcp_only"]


@dataclass
class Launch:
    """A finished launch of a scenario module on ``world`` ranks, whose ranks saved results into ``out``."""

    world: int
    out: Path
    result: CompletedProcess

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
    module: str,
    world: int,
    out: Path,
    *args: str,
    timeout: float = 420,
    mpirun_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Launch:
    """Run ``python -m <module> OUT args...`` on ``world`` ranks (see :func:`run_mpi`)."""
    argv = ["-m", module, str(out), *args]
    return Launch(world, out, run_mpi(world, argv, timeout=timeout, mpirun_args=mpirun_args, env=env))
