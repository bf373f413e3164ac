"""Gradient allreduce on real ranks equals one process training on the concatenated batches.

The rank code comes first: ``main(OUT)`` runs on every rank within the suite's one launch per world size
(``python -m tests.mpi.suite OUT``, the ``suite_launches`` fixture); the assertions follow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from tests.helpers import (
    BATCH,
    CASES,
    STEPS,
    STRATEGY_OPTIONS,
    batches_per_step,
    build,
    quiet_trainer,
    reference_parameters,
    regression_data,
    samples_needed,
    save_rank_results,
)
from tests.mpirun import Launch, launch_scenario, tcp_only


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


# -- the assertions -------------------------------------------------------------------------------------------


pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def results(launched: Launch) -> dict[str, list[dict]]:
    return {case: launched.results(case) for case in CASES}


@pytest.fixture(scope="module")
def trained(suite_launch: Launch) -> tuple[int, dict[str, list[dict]]]:
    return suite_launch.world, results(suite_launch)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_single_process_on_concatenated_batch(trained, case):
    world, results = trained
    ranks = results[case]
    reference = reference_parameters(case, world)
    dtype = CASES[case][2]
    for name, expected in reference.items():
        diff = (ranks[0]["state"][name] - expected).abs().max().item()
        assert diff <= TOLERANCE[dtype], f"{case}: {name} differs from one process by {diff}"
    assert ranks[0]["global_step"] == 20


@pytest.mark.parametrize("case", list(CASES))
def test_replicas_identical(trained, case):
    _, results = trained
    first = results[case][0]["state"]
    for other in results[case][1:]:
        for name, value in first.items():
            assert torch.equal(other["state"][name], value), f"{case}: {name} differs between ranks"


def test_parameter_without_gradient_stays_without(trained):
    _, results = trained
    assert all(r["unused_grad_is_none"] for rs in results.values() for r in rs)


def test_sync_dist_logging_is_global(trained):
    world, results = trained
    for case, ranks in results.items():
        steps = 20 * batches_per_step(case)
        for r in ranks:
            assert r["rank_mean"] == pytest.approx((world - 1) / 2, abs=1e-12)
            # reduce_fx="sum": summed over ranks at every step, then over the epoch's steps
            assert r["rank_sum"] == pytest.approx(steps * world * (world - 1) / 2)
            # logged as in one process: float32 values stay float32 (an integer count once made them float64)
            assert set(r["logged_dtypes"].values()) == {"torch.float32"}, r["logged_dtypes"]


def test_all_gather_stacks_ranks(trained):
    world, results = trained
    for r in results["sgd_momentum"]:
        assert r["all_gather"].tolist() == [[rank, 7] for rank in range(world)]


def test_tcp_transport_gives_the_same_results_as_shared_memory(suite_launches, tmp_path_factory):
    shared_memory = results(suite_launches(2))
    args, env = tcp_only()
    tcp = results(launch_scenario(__name__, 2, tmp_path_factory.mktemp("tcp"), timeout=240, mpirun_args=args, env=env))
    for case in CASES:
        for a, b in zip(shared_memory[case], tcp[case]):
            assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]), case


def test_overlapped_buckets_start_during_backward(trained):
    _, results = trained
    # overlap_sgd's bucket of the parameter without gradient waits for the end of backward, the others do not
    for case in ("overlap_sgd", "overlap_accumulate", "overlap_manual_accumulate"):
        assert all(r["overlapped_buckets"] > 0 for r in results[case]), case
    assert all(r["overlapped_buckets"] == 0 for r in results["sgd_momentum"])  # one node: no overlap by default


if __name__ == "__main__":
    main(Path(sys.argv[1]))
