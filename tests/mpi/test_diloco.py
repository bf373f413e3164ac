"""DiLoCo's outer step on real ranks (2 and 3) against hand-computed references.

The rank code comes first: ``main(OUT)`` runs on every rank within the suite's one launch per world size
(``python -m tests.mpi.suite OUT``, the ``suite_launches`` fixture); the assertions follow it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from lightning_mpi.policies import ParameterAveraging
from tests.helpers import BATCH, build, quiet_trainer, regression_data, save_rank_results

SYNCS = 3
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
PLAIN = functools.partial(torch.optim.SGD, lr=1.0)


def local_change(p: torch.Tensor, rank: int, sync: int) -> torch.Tensor:
    """What rank ``rank`` changes parameter ``p`` by before synchronisation ``sync`` (different on every rank)."""
    return 0.1 * (rank + 1) * (sync + 1) + 0.01 * torch.arange(p.numel(), dtype=p.dtype).view_as(p) * (rank - 1)


def outer_steps(factory: functools.partial, wire_dtype: str | None = None) -> dict:
    """Three synchronisations of a Linear layer whose ranks change it by known amounts: every rank's parameters
    before each synchronisation, and the parameters after it."""
    comm = world()
    torch.manual_seed(comm.rank)  # different starts: the policy begins from rank 0's
    module = nn.Linear(3, 2)
    policy = ParameterAveraging(every_n_steps=1, outer_optimizer=factory, pseudo_gradient_dtype=wire_dtype)
    policy.setup(comm, module, fitting=True, resuming=False)
    start = [p.detach().clone() for p in module.parameters()]
    members, after = [], []
    for sync in range(SYNCS):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(local_change(p, comm.rank, sync))
        members.append(comm.allgather_object([p.detach().clone() for p in module.parameters()]))
        policy.average()
        after.append([p.detach().clone() for p in module.parameters()])
    return {"start": start, "members": members, "after": after}


def _fit(epochs: int, directory: Path | None = None, resume: Path | None = None):
    comm = world()
    model, _, _ = build("adam_clip")
    strategy = MPIStrategy(sync="average", every_n_steps=4, outer_optimizer=NESTEROV)
    callbacks = [ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=-1)] if directory else []
    trainer = quiet_trainer(
        strategy=strategy, max_epochs=epochs, enable_checkpointing=bool(directory), callbacks=callbacks
    )
    data = regression_data(6 * BATCH * comm.size)
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True), ckpt_path=resume)
    return model, trainer


def main(out: Path) -> None:
    comm = world()
    results = {
        "nesterov": outer_steps(NESTEROV),
        "plain_sgd": outer_steps(PLAIN),
        "bfloat16": outer_steps(NESTEROV, "bfloat16"),
    }
    # Resume from a checkpoint written between synchronisations (6 steps per epoch, every 4) equals the
    # uninterrupted run: the outer optimizer's momentum and the last synchronised parameters come back too.
    full, _ = _fit(3)
    directory = out / f"diloco-ckpt-{comm.size}"
    _fit(2, directory)
    resumed, trainer = _fit(3, resume=directory / "last.ckpt")
    results["full"], results["resumed"] = full.state_dict(), resumed.state_dict()
    results["outer_state_keys"] = sorted(trainer.strategy.policy.state_dict()["outer"])
    save_rank_results(out, "diloco", results)


# -- the assertions -------------------------------------------------------------------------------------------


pytestmark = pytest.mark.mpi


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


def test_outer_sgd_with_rate_one_is_plain_averaging(suite_launch):
    for rank in suite_launch.results("diloco"):
        run = rank["plain_sgd"]
        for sync in range(SYNCS):
            assert max_diff(run["after"][sync], mean_of(run["members"][sync])) <= 1e-6


def test_nesterov_outer_steps_equal_the_hand_computed_ones(suite_launch):
    ranks = suite_launch.results("diloco")
    for rank in ranks:
        run = rank["nesterov"]
        expected = nesterov_by_hand(run["start"], run["members"])
        for sync in range(SYNCS):
            assert max_diff(run["after"][sync], expected[sync]) <= 1e-5, sync
        assert max_diff(run["after"][-1], ranks[0]["nesterov"]["after"][-1]) == 0.0  # every rank the same


def test_half_precision_pseudo_gradients_stay_close(suite_launch):
    for rank in suite_launch.results("diloco"):
        run = rank["bfloat16"]
        expected = nesterov_by_hand(run["start"], run["members"])
        # bfloat16 keeps 8 bits of mantissa: the changes (~0.1-1) arrive within ~0.4 %
        assert max_diff(run["after"][-1], expected[-1]) <= 2e-2
        assert max_diff(run["after"][-1], expected[-1]) > 0.0  # it did travel in bfloat16


def test_resume_equals_the_uninterrupted_run(suite_launch):
    for rank in suite_launch.results("diloco"):
        assert max_diff(list(rank["full"].values()), list(rank["resumed"].values())) == 0.0
        assert rank["outer_state_keys"] == ["anchors", "optimizer"]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
