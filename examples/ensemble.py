"""An ensemble: one member per rank, soft voting at test (``mpirun -n 4 python ensemble.py``)."""

import lightning as L
from blobs import Blobs, Classifier, trainer

from lightning_mpi import MPIStrategy, load_ensemble

if __name__ == "__main__":
    L.seed_everything(0)
    t = trainer(MPIStrategy("ensemble", voting="soft"))
    model, data = Classifier(), Blobs()
    t.fit(model, datamodule=data)
    (result,) = t.test(model, datamodule=data)  # every rank sees every sample; the members vote
    t.print(f"ensemble of {t.world_size}: test_acc {result['test_acc']:.4f}")
    # the members in one process, for inference without MPI
    members = load_ensemble(t.checkpoint_callback.last_model_path, Classifier)
    t.print(f"load_ensemble: {len(members.members)} member(s)")
