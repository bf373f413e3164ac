"""Checkpoints under 2 ranks: written once by rank 0, atomically, and resumed exactly on every rank.

The rank code comes first: ``main(OUT)`` runs on every rank within the suite's one launch per world size
(``python -m tests.mpi.suite OUT``, the ``suite_launches`` fixture); the assertions follow it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
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


# -- the assertions -------------------------------------------------------------------------------------------


pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks


@pytest.fixture(scope="module")
def results(suite_launches):
    launched = suite_launches(2)
    return {sync: launched.results(sync) for sync in ("allreduce", "average")}


def test_written_once_without_leftovers(results):
    # one file per epoch plus last.ckpt; a second writer or a temporary file would show up here
    checkpoints = ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt", "last.ckpt"]
    assert results["allreduce"][0]["files"] == checkpoints
    # averaging: each checkpoint with one directory of the ranks' own states beside it (the latest save's only)
    files, shards = results["average"][0]["files"], results["average"][0]["shards"]
    assert [f for f in files if f not in shards] == checkpoints
    assert sorted(name.split(".ranks-")[0] for name in shards) == checkpoints
    assert all(re.fullmatch(r".+\.ckpt\.ranks-[0-9a-f]{8}", name) for name in shards)
    assert all(ranks == ["rank-0.pt", "rank-1.pt"] for ranks in shards.values())


@pytest.mark.parametrize("sync", ["allreduce", "average"])
def test_resume_equals_uninterrupted_run_on_every_rank(results, sync):
    for rank in results[sync]:
        assert rank["epoch"] == 3
        for name, value in rank["full"].items():
            assert torch.equal(rank["resumed"][name], value), f"{sync}: {name} differs after resuming"


def test_replicas_identical_after_resume(results):
    a, b = results["allreduce"]
    assert all(torch.equal(a["resumed"][k], b["resumed"][k]) for k in a["resumed"])


def test_averaging_schedule_resumes(results):
    # every_n_steps=4 over 18 steps: averaged at 4, 8, 12, 16 and at the end of fit
    assert results["average"][0]["policy"] == {"steps": 18, "averagings": 5, "in_sync": True}
    a, b = results["average"]
    assert all(torch.equal(a["resumed"][k], b["resumed"][k]) for k in a["resumed"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
