"""Periodic parameter averaging and ensembles on real ranks (2 and 3)."""

from __future__ import annotations

import pytest
import torch

from lightning_mpi import load_ensemble
from tests.helpers import DigitClassifier, digits_data
from tests.mpirun import Launch

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, suite_launches) -> Launch:
    return suite_launches(request.param)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_average_every_step_equals_gradient_allreduce(launched):
    averaging = launched.results("averaging")
    assert max_diff(averaging[0]["every_step"], averaging[0]["allreduce"]) <= 1e-5


def test_warmup_steps_use_gradient_allreduce(launched):
    averaging = launched.results("averaging")
    # equal up to the rounding of the final average (exact at 2 ranks, ~3e-8 at 3)
    assert max_diff(averaging[0]["warmup_throughout"], averaging[0]["allreduce"]) <= 1e-6


def test_parameters_and_buffers_identical_after_averaging(launched):
    averaging = launched.results("averaging")
    for other in averaging[1:]:
        for key in ("every_step", "one_shot"):
            state = averaging[0][key]
            assert all(torch.equal(other[key][k], state[k]) for k in state), key
    assert "net.1.running_mean" in averaging[0]["one_shot"]  # BatchNorm statistics are part of what is averaged


def test_end_of_fit_average_is_mean_of_members(launched):
    averaging = launched.results("averaging")
    members = averaging[0]["one_shot_members"]
    assert len(members) == launched.world
    assert max_diff(members[0], members[1]) > 1e-3, "local models should differ before averaging"
    mean = {
        k: torch.stack([m[k].double() for m in members]).mean(0)
        for k in members[0]
        if members[0][k].is_floating_point()
    }
    assert max_diff(mean, averaging[0]["one_shot"]) <= 1e-6


def test_one_shot_averaging_communicates_only_at_the_end(launched):
    averaging = launched.results("averaging")
    first, last = averaging[0]["bytes_per_epoch"]
    n_params = sum(v.numel() for k, v in averaging[0]["one_shot"].items() if v.is_floating_point())
    assert last >= 4 * n_params > 10 * first  # the model once, against a few stop-flags per step


def test_ensemble_members_differ(launched):
    ensemble = launched.results("ensemble")
    weights = [r["state"]["net.0.weight"] for r in ensemble]
    assert all(not torch.equal(weights[0], w) for w in weights[1:])


def test_predict_returns_the_vote_for_the_whole_dataset_on_every_rank(launched):
    ensemble = launched.results("ensemble")
    _, test = digits_data()
    for r in ensemble:
        assert r["predictions"].shape == (len(test), 10)
        assert torch.equal(r["predictions"], ensemble[0]["predictions"])
    # the strategy's vote equals a local vote over the gathered member outputs
    assert torch.allclose(ensemble[0]["predictions"], ensemble[0]["local_vote"])


def test_ensemble_evaluation_counts_each_sample_once(launched):
    # every rank sees all test samples: metrics and logged sums must not be reduced over ranks again
    ensemble = launched.results("ensemble")
    _, test = digits_data()
    assert all(r["counts"] == (len(test), len(test)) for r in ensemble)


def test_ensemble_accuracy_at_least_weakest_member(launched):
    result = launched.results("ensemble")[0]
    assert result["ensemble_acc"] >= min(result["member_acc"]) - 1e-9
    assert result["ensemble_acc"] > 0.85


def test_saved_ensemble_reproduces_votes_in_one_process(launched):
    ensemble = launched.results("ensemble")
    model = load_ensemble(launched.out / "ensemble.ckpt", DigitClassifier)
    assert len(model.members) == launched.world
    _, test = digits_data()
    with torch.no_grad():
        assert torch.allclose(model(test.tensors[0]), ensemble[0]["predictions"], atol=1e-6)
