"""Training that relies on torch.distributed, over MPI: under MPIStrategy (a default ``DistributedSampler``,
``dist.all_reduce`` in ``training_step``, ``sync_batchnorm=True``), Lightning's DDP over ``"mpi4py"``, and Fabric's.
Each equals one process on the concatenated batches.

``python -m tests.mpi.test_torch_distributed_training OUT`` is the rank code (each scenario saves what the tests
compare); the single-process references are below it, then the tests.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

pytestmark = pytest.mark.mpi

SAMPLES, BATCH, EPOCHS, LR = 48, 4, 2, 0.1


def data(dtype: torch.dtype) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SAMPLES, 4, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(SAMPLES, 1, generator=g, dtype=torch.float64)
    return TensorDataset(x.to(dtype), y.to(dtype), torch.arange(SAMPLES))


def batchnorm_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


def plain_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


# -- on every rank ---------------------------------------------------------------------------------------


def _module(net: nn.Module, momentum: float, loader=None):
    from lightning.pytorch import LightningModule

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.seen: list[list[int]] = []
            self.rank_sums: list[float] = []
            self.layers: set[str] = set()

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            if batch_idx == 0:
                self.seen.append([])
            self.seen[-1] += index.tolist()
            total = torch.tensor([float(self.global_rank)])
            torch.distributed.all_reduce(total)  # a user collective beside the strategy's
            self.rank_sums.append(total.item())
            self.layers |= {type(m).__name__ for m in self.net}
            return nn.functional.mse_loss(self.net(x), y)

        def train_dataloader(self):
            return loader() if loader else None

        def prepare_data(self) -> None:
            # Lightning runs it on rank 0 while the others wait at a barrier over torch.distributed (a gloo group
            # of its own): slow on purpose, so that a rank that did not wait finds no marker in setup.
            time.sleep(1.0)
            (Path(os.environ["PREPARED_DIR"]) / "prepared").write_text("done")

        def setup(self, stage: str) -> None:
            self.prepared = (Path(os.environ["PREPARED_DIR"]) / "prepared").exists()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=momentum)

    return Module()


def _trainer(strategy, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def mpi_strategy_scenario(out: Path) -> None:
    """MPIStrategy with ``sync_batchnorm=True`` and the DDP idiom of a default DistributedSampler."""
    from lightning_mpi import MPIStrategy

    ds = data(torch.float32)
    module = _module(batchnorm_net(), 0.0, lambda: DataLoader(ds, batch_size=BATCH, sampler=DistributedSampler(ds)))
    trainer = _trainer(MPIStrategy(), sync_batchnorm=True, use_distributed_sampler=False)
    os.environ["PREPARED_DIR"] = str(out)
    trainer.fit(module)
    _save(
        out,
        "mpi_strategy",
        {
            "seen": module.seen,
            "rank_sums": module.rank_sums,
            "layers": module.layers,
            "prepared": module.prepared,
            "after_fit": {type(m).__name__ for m in module.net},
            "initialized": torch.distributed.is_initialized(),
            "backend": torch.distributed.get_backend(),
            "state": {k: v.clone() for k, v in module.net.state_dict().items()},
        },
    )


def ddp_scenario(out: Path) -> None:
    """Lightning's own DDPStrategy over the mpi4py backend (Lightning's sampler, DDP's reducer)."""
    from lightning.pytorch.strategies import DDPStrategy

    ds = data(torch.float64)
    module = _module(plain_net(), 0.9)
    trainer = _trainer(DDPStrategy(process_group_backend="mpi4py"), devices=_world())
    trainer.fit(module, DataLoader(ds, batch_size=BATCH))
    _save(out, "ddp", {"seen": module.seen, "state": {k: v.clone() for k, v in module.net.state_dict().items()}})


def fabric_scenario(out: Path) -> None:
    """Fabric's DDPStrategy over the mpi4py backend, with Fabric's distributed sampler."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(accelerator="cpu", devices=_world(), strategy=DDPStrategy(process_group_backend="mpi4py"))
    fabric.launch()
    net = plain_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    model, optimizer = fabric.setup(net, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(data(torch.float64), batch_size=BATCH))
    seen: list[list[int]] = []
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        seen.append([])
        for x, y, index in loader:
            seen[-1] += index.tolist()
            optimizer.zero_grad()
            fabric.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
    _save(out, "fabric", {"seen": seen, "state": {k: v.clone() for k, v in net.state_dict().items()}})


def _world() -> int:
    from lightning_mpi.comm import launcher_size

    return launcher_size()


def _save(out: Path, name: str, result: dict) -> None:
    torch.save(
        {"world": torch.distributed.get_world_size(), **result}, out / f"{name}.rank{torch.distributed.get_rank()}.pt"
    )


def main(out: Path) -> None:
    import lightning_mpi  # noqa: F401 - registers the backend

    mpi_strategy_scenario(out)  # starts torch.distributed over MPI; the DDP scenarios find it initialised
    ddp_scenario(out)
    fabric_scenario(out)


# -- one process on the concatenated batches ----------------------------------------------------------------


def reference(net: nn.Module, ds: TensorDataset, steps: list[list[int]], momentum: float) -> dict[str, torch.Tensor]:
    """SGD on ``net`` over the global batches ``steps`` (lists of sample indices), loss averaged over each."""
    x, y, _ = ds.tensors
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=momentum)
    net.train()
    for index in steps:
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[index]), y[index]).backward()
        optimizer.step()
    return net.state_dict()


def global_batches(per_rank_epochs: list[list[list[int]]]) -> list[list[int]]:
    """Step k's global batch: every rank's k-th batch, concatenated (equal batch sizes, so the mean loss matches)."""
    steps = []
    for epoch in range(len(per_rank_epochs[0])):
        rank_batches = [
            [seen[epoch][i : i + BATCH] for i in range(0, len(seen[epoch]), BATCH)] for seen in per_rank_epochs
        ]
        for k in range(len(rank_batches[0])):
            steps.append([i for batches in rank_batches for i in batches[k]])
    return steps


# -- the tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, tmp_path_factory):
    from tests.mpirun import launch_scenario

    world = request.param
    out = tmp_path_factory.mktemp(f"torchdist{world}")
    return launch_scenario(__name__, world, out, timeout=420)


def test_mpi_strategy_starts_torch_distributed_over_mpi(launched):
    for r in launched.results("mpi_strategy"):
        assert r["initialized"]
        assert r["backend"] == "mpi4py"
        steps = EPOCHS * SAMPLES // (BATCH * launched.world)
        assert r["rank_sums"] == [float(sum(range(launched.world)))] * steps


def test_prepare_data_runs_on_rank_zero_while_the_others_wait(launched):
    # Lightning's barrier around prepare_data is a gloo group made through the default group's store (it hung
    # forever with a store of each process's own)
    assert [r["prepared"] for r in launched.results("mpi_strategy")] == [True] * launched.world


def test_default_distributed_sampler_gives_ddps_partition(launched):
    for rank, r in enumerate(launched.results("mpi_strategy")):
        for epoch, seen in enumerate(r["seen"]):
            sampler = DistributedSampler(data(torch.float32), num_replicas=launched.world, rank=rank)
            sampler.set_epoch(epoch)
            assert seen == list(sampler), f"rank {rank}, epoch {epoch}"


def test_sync_batchnorm_equals_one_process_on_the_global_batch(launched):
    ranks = launched.results("mpi_strategy")
    assert ranks[0]["layers"] >= {"SyncBatchNorm"}
    assert "BatchNorm1d" not in ranks[0]["layers"]
    assert "BatchNorm1d" in ranks[0]["after_fit"]  # reverted at the end of fit, as DDP does
    expected = reference(batchnorm_net(), data(torch.float32), global_batches([r["seen"] for r in ranks]), 0.0)
    for r in ranks:
        for name, value in expected.items():
            diff = (r["state"][name].double() - value.double()).abs().max().item()
            assert diff <= 1e-5, f"{name} differs from one process on the global batch by {diff}"


@pytest.mark.parametrize("name", ["ddp", "fabric"])
def test_ddp_over_mpi4py_equals_one_process(launched, name):
    ranks = launched.results(name)
    steps = global_batches([r["seen"] for r in ranks])  # the samples Lightning's (Fabric's) sampler gave each rank
    assert len({i for s in steps for i in s}) == SAMPLES
    expected = reference(plain_net(), data(torch.float64), steps, 0.9)
    for r in ranks:
        for key, value in expected.items():
            diff = (r["state"][key] - value).abs().max().item()
            assert diff <= 1e-10, f"{name}: {key} differs from one process by {diff}"


def test_sync_batchnorm_is_refused_for_ensembles(tmp_path):
    from tests.mpirun import run_mpi

    script = tmp_path / "ensemble_syncbn.py"
    script.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from lightning.pytorch import Trainer\n"
        "from lightning.pytorch.demos.boring_classes import BoringModel\n"
        "from lightning_mpi import MPIStrategy\n"
        "Trainer(strategy=MPIStrategy(sync='ensemble'), sync_batchnorm=True, max_steps=1, logger=False,\n"
        "        enable_progress_bar=False, enable_checkpointing=False).fit(BoringModel())\n"
    )
    result = run_mpi(2, [str(script)], timeout=180)
    assert result.returncode != 0
    assert (
        "Trainer(sync_batchnorm=True) does not apply to MPIStrategy(sync='ensemble')" in result.stdout + result.stderr
    )


if __name__ == "__main__":
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    main(Path(sys.argv[1]))
