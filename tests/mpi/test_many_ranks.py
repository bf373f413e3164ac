"""Every mode at 8 and 16 ranks (oversubscribed, a small model): gradient allreduce and averaging after every SGD
step equal one process on the global batches, replicas stay identical, an ensemble's members vote alike on every
rank; an averaging checkpoint written at 16 ranks resumes at 4 and at 1 from its synchronised model.

``python -m tests.mpi.test_many_ranks OUT fit`` (at 8 or 16 ranks) and ``... OUT resume`` (at 4, and in one
process) are the rank code; the assertions follow it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.mpi

BATCH, STEPS, LR = 2, 3, 0.1


def _data(world: int) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH * STEPS * world, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, x @ torch.arange(1.0, 5.0, dtype=torch.float64).unsqueeze(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _module():
    from lightning.pytorch import LightningModule

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Net()


def _trainer(strategy, max_steps: int = STEPS):
    from lightning.pytorch import Trainer

    return Trainer(strategy=strategy, accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)  # fmt: skip


def fit(out: Path) -> None:
    from lightning_mpi import MPIStrategy

    result: dict = {}
    for name, strategy in {
        "allreduce": MPIStrategy(),
        "average": MPIStrategy("average", every_n_steps=1),
        "ensemble": MPIStrategy("ensemble", voting="mean"),
    }.items():
        trainer = _trainer(strategy)
        model = _module()
        trainer.fit(model, DataLoader(_data(trainer.world_size), batch_size=BATCH))
        result[name] = {k: v.clone() for k, v in model.state_dict().items()}
        if name == "average":
            trainer.save_checkpoint(out / "average.ckpt")
        if name == "ensemble":
            (tested,) = trainer.test(model, DataLoader(_data(1), batch_size=BATCH), verbose=False)
            result["ensemble_test_loss"] = tested["test_loss"]
    torch.save({"world": trainer.world_size, **result}, out / f"fit{trainer.world_size}.rank{trainer.global_rank}.pt")


def resume(out: Path) -> None:
    from lightning_mpi import MPIStrategy

    trainer = _trainer(MPIStrategy("average", every_n_steps=1))  # no step left: the model as resumed
    model = _module()
    trainer.fit(model, DataLoader(_data(trainer.world_size), batch_size=BATCH), ckpt_path=out / "average.ckpt")
    torch.save({"world": trainer.world_size, "model": model.state_dict(), "steps": trainer.global_step},
               out / f"resume{trainer.world_size}.rank{trainer.global_rank}.pt")  # fmt: skip


def main(out: Path, phase: str) -> None:
    {"fit": fit, "resume": resume}[phase](out)


# -- the tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[8, 16], ids=["8ranks", "16ranks"])
def launched(request, tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp(f"many{request.param}")
    return launch_scenario(__name__, request.param, out, "fit", timeout=420)


def _one_process(world: int) -> dict[str, torch.Tensor]:
    """SGD on the global batches: step k takes every rank's k-th batch (Lightning gives each rank its share through
    a shuffling DistributedSampler, seed 0, epoch 0, as under DDP)."""
    from torch.utils.data import DistributedSampler

    data = _data(world)
    x, y = data.tensors
    shares = [list(DistributedSampler(data, num_replicas=world, rank=r, shuffle=True, seed=0)) for r in range(world)]
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(STEPS):
        index = [i for share in shares for i in share[step * BATCH : (step + 1) * BATCH]]
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[index]), y[index]).backward()
        optimizer.step()
    return {f"net.{k}": v for k, v in net.state_dict().items()}


@pytest.mark.parametrize("mode", ["allreduce", "average"])
def test_equal_to_one_process_on_the_global_batches(launched, mode):
    ranks = launched.results(f"fit{launched.world}")
    expected = _one_process(launched.world)
    for key, value in expected.items():
        diff = (ranks[0][mode][key] - value).abs().max().item()
        assert diff <= 1e-12, f"{mode} at {launched.world} ranks: {key} differs from one process by {diff}"
    for rank in ranks[1:]:  # identical replicas
        assert all(torch.equal(rank[mode][k], v) for k, v in ranks[0][mode].items())


def test_ensemble_members_differ_and_vote_alike_on_every_rank(launched):
    ranks = launched.results(f"fit{launched.world}")
    weights = [rank["ensemble"]["net.0.weight"] for rank in ranks]
    assert len({w.sum().item() for w in weights}) == launched.world  # one member per rank, each its own
    assert len({rank["ensemble_test_loss"] for rank in ranks}) == 1


@pytest.mark.parametrize("launched", [16], indirect=True, ids=["16ranks"])  # the 16-rank launch, reused
def test_averaging_checkpoint_of_16_ranks_resumes_at_4_and_1(launched):
    assert launched.world == 16
    from tests.mpirun import check, launch_scenario, mpi_env

    stored = torch.load(launched.out / "average.ckpt", weights_only=False)["state_dict"]
    four = launch_scenario(__name__, 4, launched.out, "resume", timeout=300).results("resume4")
    alone = subprocess.run([sys.executable, "-m", __name__, str(launched.out), "resume"], env=mpi_env(),
                           capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    check(alone)
    one = [torch.load(launched.out / "resume1.rank0.pt", weights_only=False)]
    for rank in four + one:
        assert rank["steps"] == STEPS
        for key, value in stored.items():
            assert torch.equal(rank["model"][key], value), key


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
