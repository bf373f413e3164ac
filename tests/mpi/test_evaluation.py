"""Metrics, predictions, EarlyStopping and SIGTERM over 2 and 3 ranks equal / agree with one process.

The rank code comes first: ``main(OUT)`` runs on every rank within the suite's one launch per world size
(``python -m tests.mpi.suite OUT``, the ``suite_launches`` fixture); the assertions follow it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torchmetrics
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from tests.helpers import quiet_trainer, save_rank_results

SAMPLES = 101  # prime: never divisible by the number of ranks
CLASSES = 4


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, 6, generator=g)
    return TensorDataset(x, torch.randint(0, CLASSES, (SAMPLES,), generator=g), x.sum(1, keepdim=True))


def batch_size(world_size: int) -> int:
    return 10 if world_size == 2 else 11  # ranks end with unequal batch counts (6/5 and 4/4/3)


class Evaluated(LightningModule):
    """Classification and regression heads with metrics in a MetricCollection, a ModuleDict and a cat state."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, CLASSES + 1)
        self.classification = torchmetrics.MetricCollection(
            {
                "acc": torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES),
                "f1": torchmetrics.F1Score(task="multiclass", num_classes=CLASSES, average="macro"),
            },
            prefix="val_",
        )
        self.regression = nn.ModuleDict(
            {"mse": torchmetrics.MeanSquaredError(), "rmse": torchmetrics.MeanSquaredError(squared=False)}
        )
        self.auroc = torchmetrics.AUROC(task="multiclass", num_classes=CLASSES)  # "cat" states
        self.errors = torchmetrics.CatMetric()

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y, target = batch
        out = self(x)
        logits, value = out[:, :CLASSES], out[:, CLASSES:]
        self.classification.update(logits, y)
        self.log_dict(self.classification)
        for name, metric in self.regression.items():
            metric.update(value, target)
            self.log(f"val_{name}", metric)
        self.auroc.update(logits, y)
        self.log("val_auroc", self.auroc)
        self.errors.update((value - target).abs().squeeze(1))
        self.log("val_loss", nn.functional.mse_loss(value, target), sync_dist=True, batch_size=len(x))
        self.log("val_count", float(len(x)), reduce_fx="sum", sync_dist=True)

    def on_validation_epoch_end(self):
        self.all_errors = self.errors.compute()
        self.errors.reset()

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def metrics(out: Path) -> None:
    comm = world()
    seed_everything(0)
    model = Evaluated()
    trainer = quiet_trainer(strategy=MPIStrategy(), limit_val_batches=None)
    loader = DataLoader(dataset(), batch_size=batch_size(comm.size))
    logged = trainer.validate(model, loader, verbose=False)[0]
    predictions = torch.cat(trainer.predict(model, loader))
    save_rank_results(out, "metrics", {"logged": logged, "errors": model.all_errors, "predictions": predictions})


class RankPlateau(LightningModule):
    """A rank-local validation score that stops improving after ``rank + 2`` epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        score = float(min(self.current_epoch, self.global_rank + 2))
        self.log("score", score, on_epoch=True)  # deliberately not synced: ranks disagree

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def early_stopping(out: Path) -> None:
    comm = world()
    stop = EarlyStopping(monitor="score", mode="max", patience=1, min_delta=0.5)
    trainer = quiet_trainer(strategy=MPIStrategy(), max_epochs=20, callbacks=[stop], limit_val_batches=None)
    loader = DataLoader(dataset(), batch_size=batch_size(comm.size))
    trainer.fit(RankPlateau(), loader, loader)
    save_rank_results(out, "early", {"epoch": trainer.current_epoch})


class Terminated(RankPlateau):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.current_epoch == 1 and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before the time limit
        return super().training_step(batch, batch_idx)


def sigterm(out: Path) -> None:
    comm = world()
    seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=out / "sigterm", save_on_exception=True, save_last=True)
    trainer = quiet_trainer(strategy=MPIStrategy(), max_epochs=3, callbacks=[checkpoints], enable_checkpointing=True)
    loader = DataLoader(dataset(), batch_size=batch_size(comm.size), shuffle=True)
    model = Terminated()
    try:
        trainer.fit(model, loader)
        stopped_at = None
    except SIGTERMException:
        stopped_at = trainer.global_step
    saved = sorted(p.name for p in (out / "sigterm").iterdir())
    comm.barrier()
    resumed = quiet_trainer(strategy=MPIStrategy(), max_epochs=3)
    resumed.fit(RankPlateau(), loader, ckpt_path=out / "sigterm" / "last.ckpt")
    save_rank_results(
        out, "sigterm", {"stopped_at": stopped_at, "saved": saved, "resumed_epoch": resumed.current_epoch}
    )


def main(out: Path) -> None:
    metrics(out)
    early_stopping(out)
    sigterm(out)


# -- the assertions -------------------------------------------------------------------------------------------


pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks


@pytest.fixture(scope="module")
def reference():
    seed_everything(0)
    model = Evaluated()
    trainer = quiet_trainer(devices=1, limit_val_batches=None)
    logged = trainer.validate(model, DataLoader(dataset(), batch_size=7), verbose=False)[0]
    with torch.no_grad():
        predictions = model(dataset().tensors[0])
    return logged, model.all_errors, predictions


def test_metrics_equal_single_process(suite_launch, reference):
    expected, _, _ = reference
    assert set(expected) >= {"val_acc", "val_f1", "val_mse", "val_rmse", "val_auroc", "val_loss"}
    for rank in suite_launch.results("metrics"):
        for name, value in expected.items():
            if name == "val_count":
                continue
            assert rank["logged"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_every_sample_counted_once(suite_launch):
    for rank in suite_launch.results("metrics"):
        assert rank["logged"]["val_count"] == SAMPLES


def test_cat_state_metric_gathers_every_rank(suite_launch, reference):
    _, errors, _ = reference
    for rank in suite_launch.results("metrics"):
        assert rank["errors"].shape == (SAMPLES,)
        assert torch.allclose(rank["errors"], errors, atol=1e-6)  # contiguous shards: even the order matches


def test_predictions_whole_dataset_in_order_on_every_rank(suite_launch, reference):
    _, _, predictions = reference
    for rank in suite_launch.results("metrics"):
        assert torch.allclose(rank["predictions"], predictions, atol=1e-6)


def test_early_stopping_stops_all_ranks_together(suite_launch):
    epochs = [r["epoch"] for r in suite_launch.results("early")]
    assert len(set(epochs)) == 1, epochs
    assert epochs[0] < 20  # rank 0 plateaus first and stops everyone


def test_sigterm_on_one_rank_stops_all_at_the_same_step_and_resumes(suite_launch):
    sigterm = suite_launch.results("sigterm")
    steps = [r["stopped_at"] for r in sigterm]
    assert steps[0] is not None and len(set(steps)) == 1, steps
    assert "rank 1 received SIGTERM" in suite_launch.result.stderr
    assert "last.ckpt" in sigterm[0]["saved"]
    assert all(r["resumed_epoch"] == 3 for r in sigterm)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
