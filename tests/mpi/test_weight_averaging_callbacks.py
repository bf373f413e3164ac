"""StochasticWeightAveraging and EMAWeightAveraging with BatchNorm and validation: replicas end fit with identical
parameters and buffers, equal to DDP over gloo under the same mpirun (SWA replaces the BatchNorm buffers by new
tensors; EMA copies its averaged buffers in at ``on_train_end``).

``python -m tests.mpi.test_weight_averaging_callbacks OUT STRATEGY`` is the rank code (``mpi`` or ``ddp``, one
launch each); the assertions follow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.mpi

CALLBACKS = ("swa", "ema")


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    return TensorDataset(x, (x[:, :1] * 2 + 0.3 * torch.randn(96, 1, generator=g)))


def _fit(strategy, callback: str, world: int):
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    seed_everything(0)
    model = Net()
    chosen = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=2) if callback == "swa" else EMAWeightAveraging()
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=world,
        max_epochs=4,
        callbacks=[chosen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = _data()
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))
    return model, trainer


def main(out: Path, which: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_mpi import MPIStrategy
    from lightning_mpi.comm import launcher_rank, launcher_size

    world = launcher_size()
    for callback in CALLBACKS:
        strategy = MPIStrategy() if which == "mpi" else DDPStrategy(process_group_backend="gloo")
        model, trainer = _fit(strategy, callback, world if which == "ddp" else "auto")
        torch.save(
            {
                "world": trainer.world_size,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "val_loss": float(trainer.callback_metrics["val_loss"]),
            },
            out / f"{which}-{callback}.rank{launcher_rank()}.pt",
        )


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp("averaging_callbacks")
    return {which: launch_scenario(__name__, 2, out, which, timeout=400) for which in ("mpi", "ddp")}


@pytest.mark.parametrize("callback", CALLBACKS)
def test_replicas_identical_and_equal_to_ddp(launched, callback):
    ours = launched["mpi"].results(f"mpi-{callback}")
    ddp = launched["ddp"].results(f"ddp-{callback}")
    for name, value in ours[0]["state"].items():
        assert torch.equal(ours[1]["state"][name], value), f"{callback}: {name} differs between ranks"
        diff = (value.double() - ddp[0]["state"][name].double()).abs().max().item()
        assert diff <= 1e-5, f"{callback}: {name} differs from DDP's by {diff}"
    assert ours[0]["val_loss"] == pytest.approx(ddp[0]["val_loss"], rel=1e-5)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
