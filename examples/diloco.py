"""DiLoCo: averaging every 16 steps through an outer Nesterov optimizer (``mpirun -n 4 python diloco.py``)."""

import functools

import lightning as L
import torch
from blobs import Blobs, Classifier, trainer

from lightning_mpi import MPIStrategy

if __name__ == "__main__":
    L.seed_everything(0)
    outer = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
    t = trainer(MPIStrategy("average", every_n_steps=16, outer_optimizer=outer))
    model, data = Classifier(), Blobs()
    t.fit(model, datamodule=data)
    (result,) = t.test(model, datamodule=data, ckpt_path="best")
    t.print(f"diloco, {t.world_size} rank(s): test_acc {result['test_acc']:.4f}")
