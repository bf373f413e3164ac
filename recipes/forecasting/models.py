"""Recurrent forecasters (LSTM, BiLSTM, GRU): a window of past days in, the next ``horizon`` days out.

The modules train on scaled values (MSE) and report RMSE and MAE in case counts: the batches of
:class:`~forecasting.data.ForecastDataModule` carry each window's last day and the raw targets, and
the module's ``transform`` maps its outputs back. Under :class:`~lightning_mpi.MPIStrategy` the torchmetrics
cover all ranks; ``predict`` returns forecasts in case counts, in time order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError

from recipes.forecasting.data import WindowTransform

Batch = tuple[Tensor, Tensor, Tensor, Tensor]


class RecurrentForecaster(LightningModule):
    """A recurrent layer stack read at the last time step, then a linear layer to ``horizon`` outputs.

    Args:
        window, horizon: days in, days out.
        hidden_size, num_layers, dropout: of the recurrent stack (dropout between layers only).
        optimizer: makes the optimizer, e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)`` (the default).
        transform: maps outputs back to case counts; required for test and predict, not for training.
    """

    cell: type[nn.RNNBase] = nn.LSTM
    bidirectional: bool = False

    def __init__(
        self,
        window: int = 14,
        horizon: int = 1,
        hidden_size: int = 50,
        num_layers: int = 1,
        dropout: float = 0.0,
        optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer] | None = None,
        transform: WindowTransform | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["transform", "optimizer"])
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=1e-3)
        self.rnn = self.cell(
            1,
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=self.bidirectional,
        )
        self.head = nn.Linear(hidden_size * (2 if self.bidirectional else 1), horizon)
        self.transform = transform
        self.train_loss = MeanMetric()
        self.test_rmse = MeanSquaredError(squared=False)
        self.test_mae = MeanAbsoluteError()

    def forward(self, x: Tensor) -> Tensor:
        """``[batch, window, 1]`` scaled inputs -> ``[batch, horizon]`` scaled forecasts."""
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y, _, _ = batch
        loss = nn.functional.mse_loss(self(x), y)
        # The epoch's mean loss over all ranks. A self.log per step would cost ~0.3 ms, a tenth of this model's
        # step on one CPU thread; the metric's update costs ~0.03 ms and it is logged once per epoch.
        self.train_loss.update(loss.detach(), len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss)

    def forecast(self, batch: Batch) -> Tensor:
        """Forecasts of ``batch`` in case counts."""
        if self.transform is None:
            raise RuntimeError("This forecaster has no transform: pass transform= to report results in case counts.")
        x, _, last, _ = batch
        return self.transform.inverse(self(x), last)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        prediction, target = self.forecast(batch), batch[3]
        self.test_rmse(prediction, target)
        self.test_mae(prediction, target)
        self.log("test/rmse", self.test_rmse)
        self.log("test/mae", self.test_mae)

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.forecast(batch)

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(self.parameters())


class LSTMForecaster(RecurrentForecaster):
    """Unidirectional LSTM."""


class BiLSTMForecaster(RecurrentForecaster):
    """Bidirectional LSTM (reads the window forwards and backwards)."""

    bidirectional = True


class GRUForecaster(RecurrentForecaster):
    """GRU."""

    cell = nn.GRU
