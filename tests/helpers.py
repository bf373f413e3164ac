"""Small models and data shared by the multi-rank scenarios and their single-process references."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

FEATURES = 6


def run_scenarios(scenarios: dict[str, Callable[[Path], None]], out: Path, names: Sequence[str]) -> None:
    """Run the named scenarios (all of them if none is named) in order, each saving its results into ``out``."""
    from lightning_mpi.comm import world

    for name in names or list(scenarios):
        scenarios[name](out)
        if world().rank == 0:
            print(f"scenario {name} done", flush=True)


def save_rank_results(out: Path, name: str, result: dict) -> None:
    """What this rank saves for the test (read back with ``tests.mpirun.Launch.results``), with the world size."""
    from lightning_mpi.comm import world

    comm = world()
    torch.save({"world": comm.size, **result}, Path(out) / f"{name}.rank{comm.rank}.pt")


def regression_data(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, FEATURES, dtype=torch.float64).unsqueeze(1) + 0.1 * torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )
    return TensorDataset(x.to(dtype), y.to(dtype))


class Regressor(LightningModule):
    """An MLP with a frozen parameter and one that never gets a gradient (both must survive syncing)."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.05,
        manual: bool = False,
        log_rank: bool = False,
        step_every: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = not manual
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.unused = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.hparams.log_rank:
            self.log("rank_mean", torch.tensor(float(self.global_rank)), sync_dist=True, on_step=False, on_epoch=True)
            self.log(
                "rank_sum",
                torch.tensor(float(self.global_rank)),
                sync_dist=True,
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
            )
        if self.automatic_optimization:
            return loss
        # Lightning's accumulation pattern under manual optimization: a backward per batch (two here: the loss
        # and a penalty), a step every ``step_every`` batches.
        opt = self.optimizers()
        self.manual_backward(loss)
        if self.hparams.step_every > 1:
            self.manual_backward(0.01 * self.net[0].weight.pow(2).sum())
        if (batch_idx + 1) % self.hparams.step_every == 0:
            opt.step()
            opt.zero_grad()
        return None

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class FixedOrder(Sampler[int]):
    def __init__(self, order: Sequence[int]) -> None:
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def distributed_order(n: int, world: int, batch: int, epochs: int = 1, seed: int = 0) -> list[int]:
    """The samples of each global step under Lightning's DistributedSampler, ranks' batches concatenated."""
    order: list[int] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        total = math.ceil(n / world) * world
        perm += perm[: total - n]
        shards = [perm[r:total:world] for r in range(world)]
        for start in range(0, len(shards[0]), batch):
            for shard in shards:
                order += shard[start : start + batch]
    return order


CASES = {
    # name: (module kwargs, trainer kwargs, dtype)
    "sgd_momentum": ({"optimizer": "sgd"}, {}, torch.float32),
    "adam_clip": (
        {"optimizer": "adam", "lr": 0.02},
        {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "norm"},
        torch.float32,
    ),
    "accumulate": ({"optimizer": "sgd"}, {"accumulate_grad_batches": 2}, torch.float32),
    "manual": ({"optimizer": "sgd", "manual": True}, {}, torch.float32),
    "manual_accumulate": ({"optimizer": "sgd", "manual": True, "step_every": 3}, {}, torch.float32),
    "float64": ({"optimizer": "adam", "lr": 0.02}, {"gradient_clip_val": 0.05}, torch.float64),
    # the same training with communication overlapped with backward, in several small buckets
    "overlap_sgd": ({"optimizer": "sgd"}, {}, torch.float32),
    "overlap_accumulate": ({"optimizer": "sgd"}, {"accumulate_grad_batches": 2}, torch.float32),
    "overlap_manual_accumulate": ({"optimizer": "sgd", "manual": True, "step_every": 3}, {}, torch.float32),
}
#: MPIStrategy's arguments per case (default: none)
STRATEGY_OPTIONS = {case: {"overlap": True, "bucket_mb": 0.0002} for case in CASES if case.startswith("overlap_")}
STEPS, BATCH = 20, 4


def build(case: str, log_rank: bool = False) -> tuple[Regressor, torch.dtype, dict]:
    module_kwargs, trainer_kwargs, dtype = CASES[case]
    seed_everything(0)
    model = Regressor(**module_kwargs, log_rank=log_rank).to(dtype)
    if case in ("overlap_accumulate", "overlap_manual_accumulate"):
        # every parameter gets a gradient: every bucket completes during backward and starts then
        model.unused.requires_grad_(False)
    return model, dtype, trainer_kwargs


def batches_per_step(case: str) -> int:
    return CASES[case][1].get("accumulate_grad_batches", CASES[case][0].get("step_every", 1))


def samples_needed(case: str, world: int) -> int:
    return STEPS * batches_per_step(case) * BATCH * world


def quiet_trainer(**kwargs) -> Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return Trainer(**defaults)


def reference_parameters(case: str, world: int) -> dict[str, torch.Tensor]:
    """One process, batch world*BATCH, the samples the ranks saw, in the same order."""
    model, dtype, trainer_kwargs = build(case)
    data = regression_data(samples_needed(case, world), dtype)
    order = distributed_order(len(data), world, BATCH)
    loader = DataLoader(data, batch_size=world * BATCH, sampler=FixedOrder(order))
    quiet_trainer(max_steps=STEPS, devices=1, **trainer_kwargs).fit(model, loader)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def digits_data() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's handwritten digits (8x8), standardised; a fixed 1,497 / 300 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return TensorDataset(x[300:], y[300:]), TensorDataset(x[:300], y[:300])


class DigitClassifier(LightningModule):
    """A small MLP with BatchNorm (its running statistics must be averaged too) and a test accuracy metric."""

    def __init__(self, lr: float = 0.05, hidden: int = 32) -> None:
        super().__init__()
        import torchmetrics

        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.test_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_seen = torchmetrics.SumMetric()  # a count: wrong by a factor if samples were counted twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy)
        self.test_seen.update(torch.tensor(float(len(y))))
        self.log("test_seen", self.test_seen)
        self.log("test_logged_count", float(len(y)), reduce_fx="sum", sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ValidatedRegressor(Regressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)


class EnsembleRegressor(ValidatedRegressor):
    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class StepCollectives(LightningModule):
    """Per-step collectives in validation: an all_gather and an on_step synced log in every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(FEATURES, 1)
        self.batches = 0
        self.seen = 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        gathered = self.all_gather(torch.tensor([float(len(x))]))
        self.log("val_step_loss", nn.functional.mse_loss(self.layer(x), y), on_step=True, sync_dist=True)
        self.log("val_count", float(len(x)), reduce_fx="sum", sync_dist=True)
        self.log("gathered_count", gathered.sum(), reduce_fx="sum")
        self.batches += 1
        self.seen += len(x)


class RankShardedStream(IterableDataset):
    """An iterable dataset the user shards by rank (as under DDP): rank r yields samples r, r+N, ..."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        from lightning_mpi.comm import world

        comm = world()
        for i in range(comm.rank, len(self.data), comm.size):
            yield self.data[i]


class LazyRegressor(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(1))
