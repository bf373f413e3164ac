"""Under mpirun: checkpoints written once, resumed on every rank, equal to an uninterrupted run."""

import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from tests.helpers import BATCH, build, quiet_trainer, regression_data, save_rank_results


def fit(epochs: int, ckpt_dir: Path | None = None, resume: Path | None = None, sync: str = "allreduce"):
    comm = world()
    model, dtype, _ = build("adam_clip")
    data = regression_data(6 * BATCH * comm.size, dtype)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1)] if ckpt_dir else []
    strategy = MPIStrategy() if sync == "allreduce" else MPIStrategy(sync="average", every_n_steps=4)
    trainer = quiet_trainer(
        strategy=strategy, max_epochs=epochs, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks
    )
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True), ckpt_path=resume)
    return model, trainer


def main(out: Path) -> None:
    for sync in ("allreduce", "average"):
        full, _ = fit(3, sync=sync)
        ckpt_dir = out / f"ckpt-{sync}"
        fit(2, ckpt_dir=ckpt_dir, sync=sync)
        files = sorted(os.listdir(ckpt_dir))
        shards = {name: sorted(os.listdir(ckpt_dir / name)) for name in files if (ckpt_dir / name).is_dir()}
        resumed, trainer = fit(3, resume=ckpt_dir / "last.ckpt", sync=sync)
        save_rank_results(
            out,
            sync,
            {
                "full": full.state_dict(),
                "resumed": resumed.state_dict(),
                "files": files,
                "shards": shards,
                "epoch": trainer.current_epoch,
                "policy": trainer.strategy.policy.state_dict(),
            },
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
