"""A failing, stalled or killed rank ends the whole job promptly, with a message naming the rank; an exception
every rank raises alike propagates and is printed once.

``python -m tests.mpi.test_failures MODE`` is the rank code: one rank fails (or stalls, or dies) in the place
``MODE`` names; the assertions follow it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from tests.helpers import BATCH, Regressor, quiet_trainer, regression_data

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks

BAD_STEP = 2


class Failing(Regressor):
    def __init__(self, mode: str, lr: float) -> None:
        super().__init__(lr=lr)
        self.mode = mode

    def training_step(self, batch, batch_idx):
        mode, rank = self.mode, self.global_rank
        if mode == "every_rank" and batch_idx == BAD_STEP:
            raise ValueError("hidden_size must be positive, got -3")
        if mode == "every_rank_differs" and batch_idx == BAD_STEP:
            raise ValueError(f"rank {rank} found no data")
        if rank == 1 and batch_idx == BAD_STEP:
            if mode == "training_step":
                raise RuntimeError("deliberate failure in training_step")
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode.startswith("nan"):
                x, y = batch
                return torch.nn.functional.mse_loss(self(x), y) * float("nan")
        if mode in ("stall", "late_timeout") and batch_idx == BAD_STEP:
            if rank == 0:
                self.trainer.strategy.barrier()  # rank 1 never arrives
            else:
                time.sleep(120)
        if mode == "mismatch" and batch_idx == BAD_STEP:
            if rank == 0:
                self.trainer.strategy.barrier()  # rank 1 calls another collective instead
            else:
                self.all_gather(torch.ones(3))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if self.mode == "validation" and self.global_rank == 1 and batch_idx == 1:
            raise ValueError("deliberate failure in validation_step")
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)


class FailingCallback(Callback):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.mode == "callback" and trainer.global_rank == 1 and batch_idx == BAD_STEP:
            raise KeyError("deliberate failure in a callback")


def model(mode: str) -> Failing:
    from lightning_mpi.comm import launcher_rank

    rank = launcher_rank()
    module = Failing(mode, lr=0.1 if mode == "optimizer" and rank == 1 else 0.05)
    if mode == "shapes" and rank == 1:
        module.net[0] = torch.nn.Linear(module.net[0].in_features, 16, bias=False)
    return module


def main(mode: str) -> None:
    from lightning_mpi import MPIStrategy

    data = regression_data(64 * BATCH)
    if mode == "late_timeout":  # an earlier strategy without stall detection creates the job's communicator
        quiet_trainer(strategy=MPIStrategy(timeout=None), max_steps=1).fit(
            Regressor(), DataLoader(data, batch_size=BATCH)
        )
    trainer = quiet_trainer(
        strategy=MPIStrategy(
            timeout=3 if mode in ("stall", "late_timeout", "mismatch") else 60,
            on_nonfinite={"nan_skip": "skip", "nan_raise": "raise"}.get(mode, "ignore"),
        ),
        max_epochs=2,
        limit_val_batches=None,
        callbacks=[FailingCallback(mode)],
        devices=3 if mode == "devices" else 1,
    )
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    module = model(mode)
    trainer.fit(module, loader, DataLoader(data, batch_size=BATCH))
    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    print(f"finished without failing; skipped {trainer.strategy.skipped_steps}; finite {finite}", flush=True)


# Start-up (imports, MPI_Init) takes ~5-10 s here: anything close to the timeout would be a hang.
PROMPT = 60


def launch(mode: str, world: int = 2):
    from tests.mpirun import run_mpi

    return run_mpi(world, ["-m", __name__, mode], timeout=PROMPT)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("training_step", "RuntimeError: deliberate failure in training_step"),
        ("validation", "ValueError: deliberate failure in validation_step"),
        ("callback", "KeyError: 'deliberate failure in a callback'"),
    ],
)
def test_exception_on_one_rank_ends_every_rank(mode, message):
    result = launch(mode)
    assert result.returncode != 0
    assert "[lightning-mpi] rank 1/2 failed" in result.stderr
    assert message in result.stderr
    assert "finished without failing" not in result.stdout


def test_an_exception_every_rank_raises_alike_is_printed_once():
    result = launch("every_rank", world=3)
    assert result.returncode != 0
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert result.stderr.count("ValueError: hidden_size must be positive, got -3") == 3
    for rank in (1, 2):
        assert (
            f"[lightning-mpi] rank {rank}/3: ValueError: hidden_size must be positive, got -3 (the same exception "
            "as rank 0, which printed its traceback)" in result.stderr
        )
    assert "/3 failed" not in result.stderr  # propagated on every rank, not aborted


def test_different_exceptions_on_every_rank_are_each_printed():
    result = launch("every_rank_differs")
    assert result.returncode != 0
    assert result.stderr.count("Traceback (most recent call last)") == 2, result.stderr
    assert "ValueError: rank 0 found no data" in result.stderr
    assert "ValueError: rank 1 found no data" in result.stderr


def test_stalled_collective_is_reported_and_aborted():
    result = launch("stall")
    assert result.returncode != 0
    report = result.stderr
    assert "collective barrier did not complete within 3 s (epoch 0, step 2)" in report
    assert "ranks that did not arrive: [1]" in report
    assert "rank 1: not in a collective" in report  # rank 1 answered: it is busy outside MPI


def test_ranks_in_different_collectives_are_named_in_the_stall_report():
    result = launch("mismatch")
    assert result.returncode != 0
    report = result.stderr
    assert "did not complete within 3 s (epoch 0, step 2)" in report
    assert "wait in a different collective" in report
    assert "rank 0: waiting" in report
    assert "barrier" in report
    assert "rank 1: waiting" in report
    assert "allgather" in report


def test_the_timeout_of_the_strategy_in_use_applies():
    # A first Trainer without stall detection created the job's communicator; the second one's timeout=3 applies.
    result = launch("late_timeout")
    assert result.returncode != 0
    assert "collective barrier did not complete within 3 s" in result.stderr


def test_killed_rank_ends_the_job():
    result = launch("kill")
    assert result.returncode != 0
    assert "finished without failing" not in result.stdout


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("shapes", "The model (parameter and buffer names, shapes, dtypes) differs between rank 0 and rank 1"),
        ("optimizer", "The optimizer configuration differs between rank 0 and rank 1"),
        ("devices", "Trainer(devices=3) asks for 3 ranks per node, but the MPI launcher started 2"),
    ],
)
def test_mismatch_is_a_clear_error_not_a_hang(mode, message):
    result = launch(mode)
    assert result.returncode != 0
    assert message in result.stderr
    assert "finished without failing" not in result.stdout


def test_nonfinite_gradients_on_one_rank_skip_the_step_everywhere():
    result = launch("nan_skip")
    assert result.returncode == 0, result.stderr
    # both ranks skipped the same steps (batch 2 of each epoch) and finished with finite parameters
    assert result.stdout.count("finished without failing; skipped [2, 34]; finite True") == 2


def test_nonfinite_gradients_on_one_rank_raise_everywhere():
    result = launch("nan_raise")
    assert result.returncode != 0
    assert "FloatingPointError: Non-finite gradients at global step 2" in result.stderr


if __name__ == "__main__":
    main(sys.argv[1])
