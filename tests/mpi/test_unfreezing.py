"""Parameters unfrozen during fit (as BackboneFinetuning does) are synchronised from then on: replicas stay
identical and equal one process on the concatenated batches, at 2 and 3 ranks (DDP's reducer keeps the set it was
built with: its replicas diverge).

``python -m tests.mpi.test_unfreezing OUT`` is the rank code; the single-process reference and the assertions
follow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.mpi

SAMPLES, BATCH, EPOCHS, LR = 36, 3, 3, 0.1


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SAMPLES, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, x.sum(1, keepdim=True).sin(), torch.arange(SAMPLES))


def _net() -> nn.Module:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    net[0].requires_grad_(False)  # the "backbone", unfrozen at epoch 1
    return net


def main(out: Path) -> None:
    from lightning.pytorch import Callback, LightningModule, Trainer

    from lightning_mpi import MPIStrategy

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()
            self.seen: list[int] = []

        def training_step(self, batch, _):
            x, y, index = batch
            self.seen += index.tolist()
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)  # frozen parameters get no gradient: not moved

    class Unfreeze(Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            if trainer.current_epoch == 1:
                module.net[0].requires_grad_(True)

    module = Module()
    trainer = Trainer(
        strategy=MPIStrategy(),
        max_epochs=EPOCHS,
        callbacks=[Unfreeze()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH))
    torch.save(
        {"world": trainer.world_size, "seen": module.seen, "state": module.net.state_dict()},
        out / f"unfreeze.rank{trainer.global_rank}.pt",
    )


def reference(steps: list[list[int]]) -> dict[str, torch.Tensor]:
    x, y, _ = _data().tensors
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    per_epoch = len(steps) // EPOCHS
    for step, index in enumerate(steps):
        if step == per_epoch:
            net[0].requires_grad_(True)
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[index]), y[index]).backward()
        optimizer.step()
    return net.state_dict()


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp(f"unfreeze{request.param}")
    return launch_scenario(__name__, request.param, out, timeout=300)


def test_unfrozen_parameters_are_synchronised(launched):
    ranks = launched.results("unfreeze")
    batches = [[r["seen"][i : i + BATCH] for i in range(0, len(r["seen"]), BATCH)] for r in ranks]
    steps = [[i for rank in batches for i in rank[k]] for k in range(len(batches[0]))]
    expected = reference(steps)
    for r in ranks:
        for name, value in expected.items():
            diff = (r["state"][name] - value).abs().max().item()
            assert diff <= 1e-10, f"{name} differs from one process by {diff}"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
