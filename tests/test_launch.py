"""How ranks are found and what a launch under MPI checks."""

from __future__ import annotations

import pytest

from tests.mpirun import check, run_mpi

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks

SLURM_BATCH_STEP = {  # what mpirun inherits inside an sbatch script: the batch step's single task
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "1",
}


@pytest.mark.parametrize("env", [None, SLURM_BATCH_STEP], ids=["mpirun", "mpirun-inside-slurm"])
def test_ranks_come_from_mpi(env):
    result = check(run_mpi(3, ["-m", "tests.scenarios.ranks"], timeout=120, env=env))
    for rank in range(3):
        assert f"rank {rank} of 3, rank_zero_only {rank}" in result.stdout


def test_plain_trainer_under_mpirun_is_warned_about_once():
    result = check(run_mpi(2, ["-m", "tests.scenarios.ranks"], timeout=120))
    assert result.stderr.count("every rank will train its own, independent model") == 1
