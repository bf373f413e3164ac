"""Classification LightningModules of the studies: the MNIST CNN and a configurable MLP.

Both log loss and accuracy while training and, in ``test``, accuracy plus macro precision, recall and F1
(torchmetrics; under :class:`~lightning_mpi.MPIStrategy` they cover all ranks). Under
``MPIStrategy(sync="ensemble")`` the module's output at evaluation is the ensemble's, and the test loop also
logs each member's accuracy as ``test/member_{i}/acc``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def study_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """The study's CNN: 93,322 parameters on 28x28 grey images with 10 classes.

    Conv 3x3x32, MaxPool 2, Conv 3x3x64, MaxPool 2, Conv 3x3x64, Flatten (3*3*64 = 576), Dense 64 ReLU, Dense 10.

    >>> sum(p.numel() for p in study_cnn().parameters())
    93322
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(576, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )  # fmt: skip


def mlp(in_features: int, hidden_sizes: Sequence[int], num_classes: int, activation: str = "relu") -> nn.Sequential:
    """Flatten, then ``Linear`` + ``activation`` per hidden size, then a linear output layer.

    >>> mlp(4, [8, 8], 3, "sigmoid")[2]
    Sigmoid()
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not known: choose one of {sorted(_ACTIVATIONS)}.")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


#: Makes the optimizer of a model's parameters (Hydra: ``_target_`` and ``_partial_: true``).
OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]


class Classifier(LightningModule):
    """Cross-entropy classifier around ``self.net``; subclasses build the network.

    Args:
        num_classes: classes of the task.
        optimizer: makes the optimizer, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)`` (default: Adam, 1e-3).
    """

    net: nn.Module

    def __init__(self, num_classes: int = 10, optimizer: OptimizerFactory | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=1e-3)
        self.train_acc, self.test_metrics = _metrics(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc.update(logits.detach(), y)  # update, not forward: no per-batch accuracy is wanted
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        # Under an ensemble, ``logits`` are combined scores: the loss is only meaningful per member.
        self.log("val/loss", nn.functional.cross_entropy(logits, y), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_metrics(logits, y)
        self.log_dict(self.test_metrics)
        for i, member in enumerate(self._member_outputs(logits)):
            accuracy = (member.argmax(-1) == y).float().mean()
            # Under an ensemble every rank sees the same members and samples, and the strategy is then not
            # distributed for Lightning: sync_dist does not reduce again.
            self.log(f"test/member_{i}/acc", accuracy, batch_size=len(y), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``logits`` (the ensemble's under ``sync="ensemble"``), ``members`` ``[members, batch, classes]``,
        ``target``."""
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        logits = self(x)
        out = {"logits": logits, "members": self._member_outputs(logits)}
        if y is not None:
            out["target"] = y
        return out

    def _member_outputs(self, logits: Tensor) -> Tensor:
        """The per-member outputs of the last forward under an ensemble, else ``logits`` as the only member."""
        members = getattr(self._trainer.strategy, "member_outputs", None) if self._trainer is not None else None
        return members if members is not None else logits.detach().unsqueeze(0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


def _metrics(num_classes: int) -> tuple[Any, Any]:
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    test = MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix="test/",
    )
    return MulticlassAccuracy(num_classes, average="micro"), test


class CNNClassifier(Classifier):
    """The study's MNIST CNN (:func:`study_cnn`), Adam and cross-entropy by default."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, optimizer: OptimizerFactory | None = None) -> None:
        super().__init__(num_classes, optimizer)
        self.save_hyperparameters(ignore=["optimizer"])  # checkpoints stay plain data: weights-only loadable
        self.net = study_cnn(in_channels, num_classes)


class MLPClassifier(Classifier):
    """A multilayer perceptron (:func:`mlp`) over flattened inputs."""

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int] = (128, 64),
        activation: str = "relu",
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = mlp(in_features, list(hidden_sizes), num_classes, activation)
