"""The complete script of README: one process with ``python train.py``, several ranks with ``mpirun``."""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mpi import MPIStrategy


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)  # the mean over all ranks
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Data(L.LightningDataModule):
    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)  # the same data on every rank: the strategy gives each rank its share
        x = torch.randn(2048, 8, generator=g)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(2048, 1, generator=g)
        self.train_set, self.val_set = TensorDataset(x[:1792], y[:1792]), TensorDataset(x[1792:], y[1792:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=64, shuffle=True)  # 64 per rank

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)


if __name__ == "__main__":
    L.seed_everything(0)
    model, dm = Regressor(), Data()
    trainer = L.Trainer(strategy=MPIStrategy(), max_epochs=10, accelerator="cpu", logger=False)
    trainer.fit(model, datamodule=dm)
    # print() would run on every rank; these print on rank 0 only
    trainer.print(f"{trainer.world_size} rank(s): val_loss {trainer.callback_metrics['val_loss']:.4f}")
    rank_zero_info(f"bytes each rank sent in the last epoch: {trainer.strategy.bytes_per_epoch[-1]:,}")
