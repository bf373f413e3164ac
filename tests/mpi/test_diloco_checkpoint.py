"""A DiLoCo checkpoint written between synchronisations holds the model a synchronisation at that point gives:
``last.ckpt`` at the end of fit equals the model fit returns (its last outer step), at 2 and 3 ranks, and saving
it leaves training where it was (a fit with checkpoints equals one without).

``python -m tests.mpi.test_diloco_checkpoint OUT`` is the rank code; the assertions follow it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mpi

NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
STEPS, EVERY = 7, 5  # the fit ends 2 steps after its last synchronisation


def _fit(directory: Path | None):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_mpi import MPIStrategy

    seed_everything(0)
    model = BoringModel()
    callbacks = [ModelCheckpoint(dirpath=directory, save_last=True, every_n_train_steps=STEPS)] if directory else []
    trainer = Trainer(
        strategy=MPIStrategy(sync="average", every_n_steps=EVERY, outer_optimizer=NESTEROV),
        max_steps=STEPS,
        callbacks=callbacks,
        enable_checkpointing=bool(directory),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model)
    return model, trainer


def main(out: Path) -> None:
    checkpointed, trainer = _fit(out / "checkpoints")
    plain, _ = _fit(None)
    torch.save(
        {"world": trainer.world_size, "final": checkpointed.state_dict(), "plain": plain.state_dict()},
        out / f"fit.rank{trainer.global_rank}.pt",
    )


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp(f"diloco{request.param}")
    return launch_scenario(__name__, request.param, out, timeout=300)


def test_last_checkpoint_holds_the_model_fit_returns(launched):
    ranks = launched.results("fit")
    stored = torch.load(launched.out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in ranks[0]["final"].items():
        diff = (stored[name] - value).abs().max().item()
        assert diff <= 1e-7, f"last.ckpt's {name} differs from the model fit returned by {diff}"


def test_saving_between_synchronisations_leaves_training_as_it_was(launched):
    for r in launched.results("fit"):
        for name, value in r["plain"].items():
            assert torch.equal(r["final"][name], value), name


if __name__ == "__main__":
    main(Path(sys.argv[1]))
