"""Under mpirun: one rank fails (or stalls, or dies) in a chosen place; the job must end promptly."""

import os
import signal
import sys
import time

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import launcher_rank
from tests.scenarios.common import BATCH, Regressor, quiet_trainer, regression_data

MODE = sys.argv[1]
BAD_STEP = 2


class Failing(Regressor):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == BAD_STEP:
            if MODE == "training_step":
                raise RuntimeError("deliberate failure in training_step")
            if MODE == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        if MODE.startswith("nan") and self.global_rank == 1 and batch_idx == BAD_STEP:
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y) * float("nan")
        if MODE in ("stall", "late_timeout") and batch_idx == BAD_STEP:
            if self.global_rank == 0:
                self.trainer.strategy.barrier()  # rank 1 never arrives
            else:
                time.sleep(120)
        if MODE == "mismatch" and batch_idx == BAD_STEP:
            if self.global_rank == 0:
                self.trainer.strategy.barrier()  # rank 1 calls another collective instead
            else:
                self.all_gather(torch.ones(3))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if MODE == "validation" and self.global_rank == 1 and batch_idx == 1:
            raise ValueError("deliberate failure in validation_step")
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)


class FailingCallback(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if MODE == "callback" and trainer.global_rank == 1 and batch_idx == BAD_STEP:
            raise KeyError("deliberate failure in a callback")


def model() -> Failing:
    rank = launcher_rank()
    module = Failing(lr=0.1 if MODE == "optimizer" and rank == 1 else 0.05)
    if MODE == "shapes" and rank == 1:
        module.net[0] = torch.nn.Linear(module.net[0].in_features, 16, bias=False)
    return module


def main() -> None:
    data = regression_data(64 * BATCH)
    if MODE == "late_timeout":  # an earlier strategy without stall detection creates the job's communicator
        quiet_trainer(strategy=MPIStrategy(timeout=None), max_steps=1).fit(
            Regressor(), DataLoader(data, batch_size=BATCH)
        )
    trainer = quiet_trainer(
        strategy=MPIStrategy(
            timeout=3 if MODE in ("stall", "late_timeout", "mismatch") else 60,
            on_nonfinite={"nan_skip": "skip", "nan_raise": "raise"}.get(MODE, "ignore"),
        ),
        max_epochs=2,
        limit_val_batches=None,
        callbacks=[FailingCallback()],
        devices=3 if MODE == "devices" else 1,
    )
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    module = model()
    trainer.fit(module, loader, DataLoader(data, batch_size=BATCH))
    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    print(f"finished without failing; skipped {trainer.strategy.skipped_steps}; finite {finite}", flush=True)


if __name__ == "__main__":
    main()
