"""Every precision Lightning offers on CPU trains under every mode, at 2 ranks (bfloat16 has no MPI datatype: its
gradients and parameters are reduced in float32).

``python -m tests.mpi.test_precisions OUT`` is the rank code; the assertions follow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.mpi

PRECISIONS = ("bf16-true", "16-true", "bf16-mixed", "64-true")
MODES = {
    "allreduce": {"sync": "allreduce"},
    "average": {"sync": "average", "warmup_steps": 2, "every_n_steps": 2},
    "ensemble": {"sync": "ensemble"},
}


def main(out: Path) -> None:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_mpi import MPIStrategy

    for mode, options in MODES.items():
        for precision in PRECISIONS:
            seed_everything(0)
            model = BoringModel()
            before = model.layer.weight.detach().double().clone()
            trainer = Trainer(
                strategy=MPIStrategy(**options),
                precision=precision,
                max_steps=4,
                logger=False,
                enable_progress_bar=False,
                enable_checkpointing=False,
                enable_model_summary=False,
            )
            trainer.fit(model)
            weight = model.layer.weight.detach()
            torch.save(
                {
                    "world": trainer.world_size,
                    "dtype": weight.dtype,
                    "moved": (weight.double() - before).abs().max().item(),
                    "weight": weight.double(),
                },
                out / f"{mode}-{precision}.rank{trainer.global_rank}.pt",
            )


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp("precisions")
    return launch_scenario(__name__, 2, out, timeout=420)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_under_every_mode(launched, mode, precision):
    ranks = launched.results(f"{mode}-{precision}")
    expected_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(
        precision, torch.float32
    )
    for r in ranks:
        assert r["dtype"] == expected_dtype
        assert r["moved"] > 0
    if mode != "ensemble":  # replicas stay identical
        assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    else:  # members differ
        assert not torch.equal(ranks[0]["weight"], ranks[1]["weight"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
