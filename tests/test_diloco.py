"""DiLoCo's outer step on real ranks (2 and 3) against hand-computed references."""

from __future__ import annotations

import pytest
import torch

from tests.mpirun import Launch
from tests.scenarios.diloco import SYNCS

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, suite_launches) -> Launch:
    return suite_launches(request.param)


def mean_of(members: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(ps).mean(0) for ps in zip(*members)]


def nesterov_by_hand(start, members, lr=0.7, momentum=0.9) -> list[list[torch.Tensor]]:
    """SGD with Nesterov momentum on the averaged pseudo-gradients (anchor minus member), written out."""
    anchors, buffers, history = [p.double() for p in start], None, []
    for ranks in members:
        grads = [a - m for a, m in zip(anchors, mean_of([[p.double() for p in r] for r in ranks]))]
        buffers = grads if buffers is None else [momentum * b + g for b, g in zip(buffers, grads)]
        anchors = [a - lr * (g + momentum * b) for a, g, b in zip(anchors, grads, buffers)]
        history.append(anchors)
    return history


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def test_outer_sgd_with_rate_one_is_plain_averaging(launched):
    for rank in launched.results("diloco"):
        run = rank["plain_sgd"]
        for sync in range(SYNCS):
            assert max_diff(run["after"][sync], mean_of(run["members"][sync])) <= 1e-6


def test_nesterov_outer_steps_equal_the_hand_computed_ones(launched):
    ranks = launched.results("diloco")
    for rank in ranks:
        run = rank["nesterov"]
        expected = nesterov_by_hand(run["start"], run["members"])
        for sync in range(SYNCS):
            assert max_diff(run["after"][sync], expected[sync]) <= 1e-5, sync
        assert max_diff(run["after"][-1], ranks[0]["nesterov"]["after"][-1]) == 0.0  # every rank the same


def test_half_precision_pseudo_gradients_stay_close(launched):
    for rank in launched.results("diloco"):
        run = rank["bfloat16"]
        expected = nesterov_by_hand(run["start"], run["members"])
        # bfloat16 keeps 8 bits of mantissa: the changes (~0.1-1) arrive within ~0.4 %
        assert max_diff(run["after"][-1], expected[-1]) <= 2e-2
        assert max_diff(run["after"][-1], expected[-1]) > 0.0  # it did travel in bfloat16


def test_resume_equals_the_uninterrupted_run(launched):
    for rank in launched.results("diloco"):
        assert max_diff(list(rank["full"].values()), list(rank["resumed"].values())) == 0.0
        assert rank["outer_state_keys"] == ["anchors", "optimizer"]
