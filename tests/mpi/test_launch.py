"""How ranks are found and what a launch under MPI checks (possibly inside a Slurm allocation): ranks come from
MPI, plain Trainers are warned about.

The rank code comes first (``python -m tests.mpi.test_launch``); the assertions follow it.
"""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from tests.helpers import BATCH, Regressor, quiet_trainer, regression_data
from tests.mpirun import check, run_mpi


def main() -> None:
    import lightning_mpi  # noqa: F401  (registers strategy="mpi")

    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer = quiet_trainer(strategy="mpi", max_steps=1)
    trainer.fit(Regressor(), DataLoader(regression_data(8 * BATCH), batch_size=BATCH))
    print(f"rank {trainer.global_rank} of {trainer.world_size}, rank_zero_only {rank_zero_only.rank}", flush=True)


# -- the assertions -------------------------------------------------------------------------------------------


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
    result = check(run_mpi(3, ["-m", __name__], timeout=120, env=env))
    for rank in range(3):
        assert f"rank {rank} of 3, rank_zero_only {rank}" in result.stdout


def test_plain_trainer_under_mpirun_is_warned_about_once():
    result = check(run_mpi(2, ["-m", __name__], timeout=120))
    assert result.stderr.count("every rank will train its own, independent model") == 1


if __name__ == "__main__":
    main()
