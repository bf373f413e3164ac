"""Checkpoints under 2 ranks: written once by rank 0, atomically, and resumed exactly on every rank."""

from __future__ import annotations

import re

import pytest
import torch

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
