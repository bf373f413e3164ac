"""Paths where MPIStrategy must give what DDP over gloo gives under the same mpirun (and one process):
the random-number stream (DDP re-seeds at setup: dropout masks, ``torch.rand`` in ``training_step``) and an integer
``limit_val_batches`` / ``limit_test_batches`` (the same samples one process evaluates in ``limit * world`` batches).

``python -m tests.mpi.test_ddp_parity OUT mpi|ddp`` is the rank code, one launch per strategy; assertions follow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.mpi

LIMIT, BATCH = 2, 5


def _data(n: int = 80) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + torch.arange(n, dtype=torch.float32).unsqueeze(1) / n)


def _module():
    from lightning.pytorch import LightningModule

    class Noisy(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            x = x + 0.1 * torch.rand_like(x)  # a random stream of the user's own
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, _):
            self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]), sync_dist=True)

        def test_step(self, batch, _):
            self.log("test_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Noisy()


def _trainer(strategy, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def main(out: Path, which: str) -> None:
    from lightning.pytorch import seed_everything
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_mpi import MPIStrategy
    from lightning_mpi.comm import launcher_rank, launcher_size

    world = launcher_size()

    def strategy():
        return MPIStrategy() if which == "mpi" else DDPStrategy(process_group_backend="gloo")

    devices = {"devices": world} if which == "ddp" else {}
    seed_everything(7)
    model = _module()
    trainer = _trainer(strategy(), limit_val_batches=LIMIT, **devices)
    trainer.fit(model, DataLoader(_data(), batch_size=BATCH, shuffle=True), DataLoader(_data(), batch_size=BATCH))
    val_loss = float(trainer.callback_metrics["val_loss"])
    tester = _trainer(strategy(), limit_test_batches=LIMIT, **devices)
    test_loss = float(tester.test(model, DataLoader(_data(), batch_size=BATCH), verbose=False)[0]["test_loss"])
    torch.save(
        {
            "world": trainer.world_size,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "val_loss": val_loss,
            "test_loss": test_loss,
        },
        out / f"{which}.rank{launcher_rank()}.pt",
    )


def one_process_loss(state: dict, batches: int) -> float:
    """The mean over the first ``batches`` batches of the evaluation set, as one process logs it."""
    model = _module()
    model.load_state_dict(state)
    model.eval()
    x, y = _data().tensors
    with torch.no_grad():
        losses = [
            nn.functional.mse_loss(model.net(x[i : i + BATCH]), y[i : i + BATCH])
            for i in range(0, batches * BATCH, BATCH)
        ]
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp("parity")
    return {which: launch_scenario(__name__, 2, out, which, timeout=300) for which in ("mpi", "ddp")}


def test_random_stream_and_parameters_equal_ddp(launched):
    ours, ddp = launched["mpi"].results("mpi"), launched["ddp"].results("ddp")
    for name, value in ddp[0]["state"].items():
        diff = (ours[0]["state"][name] - value).abs().max().item()
        assert diff <= 1e-6, f"{name} differs from DDP's by {diff} (dropout masks or torch.rand differ)"


@pytest.mark.parametrize("stage", ["val_loss", "test_loss"])
def test_integer_evaluation_limit_sees_the_samples_one_process_and_ddp_see(launched, stage):
    ours, ddp = launched["mpi"].results("mpi"), launched["ddp"].results("ddp")
    expected = one_process_loss(ours[0]["state"], LIMIT * launched["mpi"].world)
    for r in ours:
        assert r[stage] == pytest.approx(expected, rel=1e-5)
    assert ddp[0][stage] == pytest.approx(expected, rel=1e-5)  # the reference agrees


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
