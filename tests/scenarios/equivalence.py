"""Under mpirun: train every equivalence case with MPIStrategy and save each rank's parameters."""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from tests.helpers import (
    BATCH,
    CASES,
    STEPS,
    STRATEGY_OPTIONS,
    build,
    quiet_trainer,
    regression_data,
    samples_needed,
    save_rank_results,
)


def main(out: Path) -> None:
    comm = world()
    for case in CASES:
        model, dtype, trainer_kwargs = build(case, log_rank=True)
        # Different seeds per rank before the Trainer: the strategy must still start replicas from rank 0.
        torch.manual_seed(1000 + comm.rank)
        for p in model.net.parameters():
            p.data.add_(torch.randn_like(p) * 0.01 * comm.rank)
        data = regression_data(samples_needed(case, comm.size), dtype)
        strategy = MPIStrategy(**STRATEGY_OPTIONS.get(case, {}))
        trainer = quiet_trainer(strategy=strategy, max_steps=STEPS, **trainer_kwargs)
        trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True))
        gathered = trainer.strategy.all_gather(torch.tensor([comm.rank, 7]))
        save_rank_results(
            out,
            case,
            {
                "state": model.state_dict(),
                "unused_grad_is_none": model.unused.grad is None,
                "rank_mean": trainer.callback_metrics["rank_mean"].item(),
                "rank_sum": trainer.callback_metrics["rank_sum"].item(),
                "logged_dtypes": {k: str(v.dtype) for k, v in trainer.callback_metrics.items()},
                "all_gather": gathered,
                "global_step": trainer.global_step,
                "overlapped_buckets": getattr(trainer.strategy.policy, "overlapped_buckets", 0),
            },
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
