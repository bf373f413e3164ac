"""Local SGD: ranks train alone and average parameters every 16 steps (``mpirun -n 4 python averaging.py``)."""

import lightning as L
from blobs import Blobs, Classifier, trainer

from lightning_mpi import MPIStrategy

if __name__ == "__main__":
    L.seed_everything(0)
    t = trainer(MPIStrategy("average", every_n_steps=16))
    model, data = Classifier(), Blobs()
    t.fit(model, datamodule=data)
    (result,) = t.test(model, datamodule=data, ckpt_path="best")  # the checkpoint holds the averaged model
    sent = t.strategy.bytes_per_epoch
    t.print(f"average, {t.world_size} rank(s): test_acc {result['test_acc']:.4f}, bytes sent per epoch {sent}")
