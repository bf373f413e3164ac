"""Under mpirun (possibly inside a Slurm allocation): ranks come from MPI; plain Trainers are warned about."""

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

import lightning_mpi  # noqa: F401  (registers strategy="mpi")
from tests.helpers import BATCH, Regressor, quiet_trainer, regression_data

Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
trainer = quiet_trainer(strategy="mpi", max_steps=1)
trainer.fit(Regressor(), DataLoader(regression_data(8 * BATCH), batch_size=BATCH))
print(f"rank {trainer.global_rank} of {trainer.world_size}, rank_zero_only {rank_zero_only.rank}", flush=True)
