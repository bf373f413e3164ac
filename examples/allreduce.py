"""Gradient allreduce: one model, gradients averaged every step (``mpirun -n 4 python allreduce.py``)."""

import lightning as L
from blobs import Blobs, Classifier, trainer

from lightning_mpi import MPIStrategy

if __name__ == "__main__":
    L.seed_everything(0)
    t = trainer(MPIStrategy())
    model, data = Classifier(), Blobs()
    t.fit(model, datamodule=data)
    (result,) = t.test(model, datamodule=data, ckpt_path="best")
    best = t.checkpoint_callback.best_model_path
    t.print(f"allreduce, {t.world_size} rank(s): test_acc {result['test_acc']:.4f}, best checkpoint {best}")
