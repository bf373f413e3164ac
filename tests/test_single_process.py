"""Without mpirun, MPIStrategy is a single-device Trainer: same parameters, same logs, no MPI."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

import lightning_mpi
from lightning_mpi import MPIStrategy
from tests.scenarios.common import BATCH, build, quiet_trainer, regression_data


def train(strategy) -> tuple[dict[str, torch.Tensor], Trainer]:
    model, dtype, trainer_kwargs = build("adam_clip", log_rank=True)
    trainer = quiet_trainer(max_epochs=2, strategy=strategy, **trainer_kwargs)
    trainer.fit(model, DataLoader(regression_data(10 * BATCH, dtype), batch_size=BATCH, shuffle=True))
    return model.state_dict(), trainer


def test_world_size_one_equals_single_device_trainer():
    expected, plain = train("auto")
    got, ours = train(MPIStrategy())
    assert isinstance(ours.strategy, MPIStrategy) and ours.world_size == 1
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert ours.callback_metrics["rank_mean"] == plain.callback_metrics["rank_mean"] == 0


def test_registered_name():
    assert "mpi" in lightning_mpi.MPIStrategy.strategy_name
    trainer = Trainer(strategy="mpi", accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, MPIStrategy)


def test_clear_errors_for_bad_arguments():
    import pytest

    with pytest.raises(ValueError, match="sync='average'"):
        MPIStrategy(every_n_steps=3)
    with pytest.raises(ValueError, match="only applies to MPIStrategy\\(sync='ensemble'\\)"):
        MPIStrategy(voting="soft")
    with pytest.raises(ValueError, match="choose 'allreduce', 'average' or 'ensemble'"):
        MPIStrategy(sync="gossip")
    with pytest.raises(ValueError, match="voting='majority' is not known"):
        MPIStrategy(sync="ensemble", voting="majority")
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        MPIStrategy(sync="average", every_n_steps=0)
