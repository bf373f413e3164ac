"""Under srun or sbatch (see tests/test_slurm.py): what each rank sees of its launch, and a run Slurm stops.

python -m tests.scenarios.slurm launch OUT     # ranks before and after fit, then the equivalence cases
python -m tests.scenarios.slurm stopped OUT    # trains slowly until Slurm's SIGTERM stops every rank
python -m tests.scenarios.slurm resumed OUT    # continues from the checkpoint the stopped run left
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import mpi_library, world
from tests.helpers import BATCH, Regressor, quiet_trainer, regression_data
from tests.scenarios import equivalence

#: steps of the run Slurm stops (a bound: it is stopped long before) and of the resumed run after the stop
STOPPED_STEPS, RESUMED_STEPS = 1000, 5
#: rank 0 writes this file into OUT once training is under way: the test then has Slurm end the job
MARKER = "training"


def launch(out: Path) -> None:
    """Record what Lightning is told before any communicator exists, and what MPI says; then train the cases."""
    trainer = quiet_trainer(strategy=MPIStrategy(), max_steps=1)
    before = {"world_size": trainer.world_size, "global_rank": trainer.global_rank}
    comm = world()
    record = {
        "world": comm.size,
        "rank": comm.rank,
        "node": (comm.local_size, comm.num_nodes),
        "before_fit": before,
        "library": mpi_library(),
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }
    (out / f"launch.rank{comm.rank}.json").write_text(json.dumps(record))
    equivalence.main(out)


class Slow(Regressor):
    """Sleeps a little every step, so that the job is still training when Slurm signals it."""

    def __init__(self) -> None:
        super().__init__()
        self.out = Path(".")  # set by _fit (not an argument: checkpoints keep hyper-parameters, loaded weights-only)
        self.started_at: int | None = None

    def on_train_start(self) -> None:
        self.started_at = self.global_step

    def training_step(self, batch, batch_idx):
        if self.global_rank == 0 and self.global_step == (self.started_at or 0) + 5:
            (self.out / MARKER).touch()
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def _fit(out: Path, max_steps: int, ckpt_path: Path | None) -> dict:
    comm = world()
    seed_everything(0)
    model = Slow()
    model.out = out
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_on_exception=True, save_last=True)
    trainer = quiet_trainer(
        strategy=MPIStrategy(), max_steps=max_steps, callbacks=[checkpoints], enable_checkpointing=True
    )
    data = regression_data(STOPPED_STEPS * BATCH * comm.size)
    stopped_at = None
    try:
        trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True), ckpt_path=ckpt_path)
    except SIGTERMException:
        stopped_at = trainer.global_step
    return {
        "world": comm.size,
        "rank": comm.rank,
        "started_at": model.started_at,
        "stopped_at": stopped_at,
        "global_step": trainer.global_step,
        "weights": [p.detach().double().sum().item() for p in model.parameters()],
    }


def stopped(out: Path) -> None:
    """Train until Slurm's SIGTERM (a time limit, scancel) stops every rank; record where each one stopped."""
    record = _fit(out, STOPPED_STEPS, None)
    (out / f"stopped.rank{record['rank']}.json").write_text(json.dumps(record))


def resumed(out: Path) -> None:
    """Continue from the checkpoint the stopped run left, for a few more steps."""
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    record = _fit(out, saved + RESUMED_STEPS, out / "checkpoints" / "last.ckpt")
    record["checkpoint_step"] = saved
    (out / f"resumed.rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    {"launch": launch, "stopped": stopped, "resumed": resumed}[sys.argv[1]](Path(sys.argv[2]))
