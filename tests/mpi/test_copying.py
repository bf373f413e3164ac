"""After fit on several ranks, the Trainer's callbacks deep-copy and the strategy pickles, in every mode (Lightning's
own tests ``deepcopy(trainer.callbacks)``, which reaches the strategy through the progress bar; the gradient buckets'
prepared requests made that fail).

``python -m tests.mpi.test_copying OUT`` is the rank code; the assertions follow it.
"""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mpi

MODES = {"allreduce": {}, "average": {"every_n_steps": 1, "warmup_steps": 1}, "ensemble": {}}


def main(out: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_mpi import MPIStrategy

    copied = {}
    for mode, options in MODES.items():
        trainer = Trainer(strategy=MPIStrategy(mode, **options), accelerator="cpu", max_steps=2, logger=False,
                          enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1)  # fmt: skip
        trainer.fit(BoringModel())
        callbacks = copy.deepcopy(trainer.callbacks)
        strategy = pickle.loads(pickle.dumps(trainer.strategy))
        copied[mode] = [type(c).__name__ for c in callbacks], type(strategy.policy).__name__
    torch.save({"world": trainer.world_size, "copied": copied}, out / f"copying.rank{trainer.global_rank}.pt")


def test_callbacks_deep_copy_and_the_strategy_pickles_after_fit(tmp_path):
    from tests.mpirun import launch_scenario

    for rank in launch_scenario(__name__, 2, tmp_path, timeout=300).results("copying"):
        policies = {mode: policy for mode, (_, policy) in rank["copied"].items()}
        assert policies == {"allreduce": "GradientAllreduce", "average": "ParameterAveraging", "ensemble": "Ensemble"}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
