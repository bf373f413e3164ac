"""Periodic parameter averaging and ensembles on real ranks (2 and 3).

The rank code comes first: ``main(OUT)`` runs on every rank within the suite's one launch per world size
(``python -m tests.mpi.suite OUT``, the ``suite_launches`` fixture); the assertions follow it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy, load_ensemble
from lightning_mpi.comm import world
from lightning_mpi.voting import hard_vote_scores
from tests.helpers import (
    BATCH,
    DigitClassifier,
    build,
    digits_data,
    quiet_trainer,
    regression_data,
    save_rank_results,
)


class GatherLocalModels(Callback):
    """Before the strategy's end-of-fit averaging, keep every rank's local model (rank order)."""

    def on_train_end(self, trainer, pl_module):
        self.members = world().allgather_object({k: v.clone() for k, v in pl_module.state_dict().items()})


def averaging(out: Path) -> None:
    comm = world()
    results = {}
    # Plain SGD: averaging after every step is gradient allreduce.
    variants = (
        ("allreduce", MPIStrategy()),
        ("every_step", MPIStrategy(sync="average", every_n_steps=1)),
        ("warmup_throughout", MPIStrategy(sync="average", warmup_steps=20)),  # post-local SGD, never local
    )
    for name, strategy in variants:
        model, _, _ = build("sgd_momentum")
        model.configure_optimizers = lambda m=model: torch.optim.SGD(m.parameters(), lr=0.05)
        trainer = quiet_trainer(strategy=strategy, max_steps=20)
        trainer.fit(model, DataLoader(regression_data(20 * BATCH * comm.size), batch_size=BATCH, shuffle=True))
        results[name] = model.state_dict()
    # One-shot: train locally (with BatchNorm), average once at the end.
    seed_everything(0)
    model = DigitClassifier()
    gather = GatherLocalModels()
    strategy = MPIStrategy(sync="average", every_n_steps=None)
    trainer = quiet_trainer(strategy=strategy, max_epochs=2, callbacks=[gather])
    train, _ = digits_data()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    results["one_shot"] = model.state_dict()
    results["one_shot_members"] = gather.members
    results["bytes_per_epoch"] = strategy.bytes_per_epoch
    save_rank_results(out, "averaging", results)


def ensemble(out: Path) -> None:
    comm = world()
    seed_everything(0)  # same seed everywhere: the strategy must still make the members differ
    model = DigitClassifier(lr=0.1)
    strategy = MPIStrategy(sync="ensemble", voting="hard")
    trainer = quiet_trainer(strategy=strategy, max_epochs=4)
    train, test = digits_data()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    test_loader = DataLoader(test, batch_size=64)
    tested = trainer.test(model, test_loader, verbose=False)[0]
    ensemble_acc = tested["test_acc"]
    predictions = torch.cat(trainer.predict(model, test_loader))
    # Each member's own logits, outside the strategy's evaluation (plain forward), and their accuracies.
    model.eval()
    with torch.no_grad():
        own = model(test.tensors[0])
    members = torch.stack(comm.allgather(own))
    member_acc = [(m.argmax(-1) == test.tensors[1]).float().mean().item() for m in members]
    path = out / "ensemble.ckpt"
    trainer.save_checkpoint(path)
    save_rank_results(
        out,
        "ensemble",
        {
            "state": model.state_dict(),
            "predictions": predictions,
            "local_vote": hard_vote_scores(members),
            "ensemble_acc": ensemble_acc,
            "counts": (tested["test_seen"], tested["test_logged_count"]),
            "member_acc": member_acc,
        },
    )


def main(out: Path) -> None:
    averaging(out)
    ensemble(out)


# -- the assertions -------------------------------------------------------------------------------------------


pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_average_every_step_equals_gradient_allreduce(suite_launch):
    averaging = suite_launch.results("averaging")
    assert max_diff(averaging[0]["every_step"], averaging[0]["allreduce"]) <= 1e-5


def test_warmup_steps_use_gradient_allreduce(suite_launch):
    averaging = suite_launch.results("averaging")
    # equal up to the rounding of the final average (exact at 2 ranks, ~3e-8 at 3)
    assert max_diff(averaging[0]["warmup_throughout"], averaging[0]["allreduce"]) <= 1e-6


def test_parameters_and_buffers_identical_after_averaging(suite_launch):
    averaging = suite_launch.results("averaging")
    for other in averaging[1:]:
        for key in ("every_step", "one_shot"):
            state = averaging[0][key]
            assert all(torch.equal(other[key][k], state[k]) for k in state), key
    assert "net.1.running_mean" in averaging[0]["one_shot"]  # BatchNorm statistics are part of what is averaged


def test_end_of_fit_average_is_mean_of_members(suite_launch):
    averaging = suite_launch.results("averaging")
    members = averaging[0]["one_shot_members"]
    assert len(members) == suite_launch.world
    assert max_diff(members[0], members[1]) > 1e-3, "local models should differ before averaging"
    mean = {
        k: torch.stack([m[k].double() for m in members]).mean(0)
        for k in members[0]
        if members[0][k].is_floating_point()
    }
    assert max_diff(mean, averaging[0]["one_shot"]) <= 1e-6


def test_one_shot_averaging_communicates_only_at_the_end(suite_launch):
    averaging = suite_launch.results("averaging")
    first, last = averaging[0]["bytes_per_epoch"]
    n_params = sum(v.numel() for k, v in averaging[0]["one_shot"].items() if v.is_floating_point())
    assert last >= 4 * n_params > 10 * first  # the model once, against a few stop-flags per step


def test_ensemble_members_differ(suite_launch):
    ensemble = suite_launch.results("ensemble")
    weights = [r["state"]["net.0.weight"] for r in ensemble]
    assert all(not torch.equal(weights[0], w) for w in weights[1:])


def test_predict_returns_the_vote_for_the_whole_dataset_on_every_rank(suite_launch):
    ensemble = suite_launch.results("ensemble")
    _, test = digits_data()
    for r in ensemble:
        assert r["predictions"].shape == (len(test), 10)
        assert torch.equal(r["predictions"], ensemble[0]["predictions"])
    # the strategy's vote equals a local vote over the gathered member outputs
    assert torch.allclose(ensemble[0]["predictions"], ensemble[0]["local_vote"])


def test_ensemble_evaluation_counts_each_sample_once(suite_launch):
    # every rank sees all test samples: metrics and logged sums must not be reduced over ranks again
    ensemble = suite_launch.results("ensemble")
    _, test = digits_data()
    assert all(r["counts"] == (len(test), len(test)) for r in ensemble)


def test_ensemble_accuracy_at_least_weakest_member(suite_launch):
    result = suite_launch.results("ensemble")[0]
    assert result["ensemble_acc"] >= min(result["member_acc"]) - 1e-9
    assert result["ensemble_acc"] > 0.85


def test_saved_ensemble_reproduces_votes_in_one_process(suite_launch):
    ensemble = suite_launch.results("ensemble")
    model = load_ensemble(suite_launch.out / "ensemble.ckpt", DigitClassifier)
    assert len(model.members) == suite_launch.world
    _, test = digits_data()
    with torch.no_grad():
        assert torch.allclose(model(test.tensors[0]), ensemble[0]["predictions"], atol=1e-6)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
