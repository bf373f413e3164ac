"""What the mode examples share: a small classifier with torchmetrics, and Gaussian blobs as data."""

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

CLASSES = 4


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, CLASSES))
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)  # synchronised over the ranks
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Blobs(L.LightningDataModule):
    """Four Gaussian blobs in 16 dimensions: 4,096 training, 1,024 validation and 1,024 test samples."""

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)  # the same data on every rank: the strategy shares it out
        centres = 0.35 * torch.randn(CLASSES, 16, generator=g)
        y = torch.randint(0, CLASSES, (6144,), generator=g)
        x = centres[y] + torch.randn(6144, 16, generator=g)
        self.train_set = TensorDataset(x[:4096], y[:4096])
        self.val_set = TensorDataset(x[4096:5120], y[4096:5120])
        self.test_set = TensorDataset(x[5120:], y[5120:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=256)


def trainer(strategy, out: str = "example-logs", **kwargs) -> L.Trainer:
    """A Trainer with the callbacks and logger every example uses."""
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(monitor="val_loss", save_last=True),
        L.pytorch.callbacks.EarlyStopping(monitor="val_loss", patience=3),
    ]
    logger = L.pytorch.loggers.CSVLogger(out)
    return L.Trainer(strategy=strategy, accelerator="cpu", max_epochs=8, callbacks=callbacks, logger=logger, **kwargs)
