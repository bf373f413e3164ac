"""Checkpoints that scale: each rank writes its own state beside the ordinary file, and a checkpoint resumes at
another world size. Written at 2 ranks between synchronisations, averaging and DiLoCo checkpoints resume at 1 and 3
ranks from their synchronised model (at 1 rank: equal to a plain single-device Trainer resuming the same file); an
ensemble checkpoint tests at 1, 2 and 3 ranks with the same result as its members in one process; an ensemble fit
does not resume at another world size, with an error naming both counts on every rank.

``python -m tests.mpi.test_checkpoint_world_sizes OUT write`` (at 2 ranks) then ``... OUT resume`` (at 1, 2 and 3)
are the rank code; the assertions follow it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.mpi

WRITTEN_AT = 2
STEPS, MORE = 7, 4  # written 7 steps in (averaging every 3: between synchronisations), then 4 more steps
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
MODES = {
    "average": {"sync": "average", "every_n_steps": 3},
    "diloco": {"sync": "average", "every_n_steps": 3, "outer_optimizer": NESTEROV},
}


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x.sum(1, keepdim=True) > 0).long().squeeze(1))


def _module():
    from lightning.pytorch import LightningModule

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)).double()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", nn.functional.cross_entropy(self(x), y), reduce_fx="mean")

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    return Net()


def _trainer(strategy, max_steps: int, **kwargs):
    from lightning.pytorch import Trainer

    options = {"enable_checkpointing": False, **kwargs}
    return Trainer(strategy=strategy, accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, **options)  # fmt: skip


def _loader() -> DataLoader:
    return DataLoader(_data(), batch_size=16)


def write(out: Path) -> None:
    from lightning.pytorch import seed_everything

    from lightning_mpi import MPIStrategy

    for name, options in MODES.items():
        seed_everything(0)
        trainer = _trainer(MPIStrategy(**options), STEPS)
        trainer.fit(_module(), _loader())
        trainer.save_checkpoint(out / f"{name}.ckpt")  # steps 7: one step after the synchronisation at 6
    # ModelCheckpoint with the layout: top-k removal takes the ranks' directories along, "last" as a link
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0)
    kept = ModelCheckpoint(dirpath=out / "topk", monitor="step", mode="max", save_top_k=2, every_n_train_steps=2,
                           save_last="link")  # fmt: skip
    _trainer(MPIStrategy(**MODES["average"]), STEPS, callbacks=[kept], enable_checkpointing=True).fit(
        _module(), _loader()
    )
    seed_everything(0)
    trainer = _trainer(MPIStrategy("ensemble", voting="mean"), STEPS)
    model = _module()
    trainer.fit(model, _loader())
    trainer.save_checkpoint(out / "ensemble.ckpt")
    (tested,) = trainer.test(model, DataLoader(_data(), batch_size=64), verbose=False)
    torch.save({"world": trainer.world_size, "test_loss": tested["test_loss"]},
               out / f"write.rank{trainer.global_rank}.pt")  # fmt: skip


def resume(out: Path) -> None:
    from lightning.pytorch import seed_everything

    from lightning_mpi import MPIStrategy

    result: dict = {}
    seed_everything(0)
    linked = _trainer(MPIStrategy(**MODES["average"]), STEPS)  # through the link: each rank finds its own state
    linked.fit(_module(), _loader(), ckpt_path=out / "topk" / "last.ckpt")
    result["through_link_steps"] = linked.global_step
    for name, options in MODES.items():
        seed_everything(0)
        trainer = _trainer(MPIStrategy(**options), STEPS)  # no step left: the model resumed
        model = _module()
        trainer.fit(model, _loader(), ckpt_path=out / f"{name}.ckpt")
        result[f"{name}_resumed"] = {k: v.clone() for k, v in model.state_dict().items()}
        seed_everything(0)
        trainer = _trainer(MPIStrategy(**options), STEPS + MORE)
        model = _module()
        trainer.fit(model, _loader(), ckpt_path=out / f"{name}.ckpt")
        result[f"{name}_trained"] = {k: v.clone() for k, v in model.state_dict().items()}
        result[f"{name}_steps"] = trainer.global_step
    trainer = _trainer(MPIStrategy("ensemble", voting="mean"), STEPS)
    (tested,) = trainer.test(_module(), DataLoader(_data(), batch_size=64), ckpt_path=out / "ensemble.ckpt",
                             verbose=False)  # fmt: skip
    result["ensemble_test_loss"] = tested["test_loss"]
    try:
        _trainer(MPIStrategy("ensemble"), STEPS + MORE).fit(_module(), _loader(), ckpt_path=out / "ensemble.ckpt")
        result["ensemble_fit"] = "resumed"
    except ValueError as error:
        result["ensemble_fit"] = str(error)
    torch.save(
        {"world": trainer.world_size, **result}, out / f"resume{trainer.world_size}.rank{trainer.global_rank}.pt"
    )


def main(out: Path, phase: str) -> None:
    {"write": write, "resume": resume}[phase](out)


# -- the tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from tests.mpirun import launch_scenario

    out = tmp_path_factory.mktemp("world-sizes")
    return launch_scenario(__name__, WRITTEN_AT, out, "write", timeout=300)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["1rank", "2ranks", "3ranks"])
def resumed(request, written):
    from tests.mpirun import launch_scenario

    launched = launch_scenario(__name__, request.param, written.out, "resume", timeout=300)
    return launched.results(f"resume{request.param}")


def _stored(written, name: str) -> dict:
    return torch.load(written.out / f"{name}.ckpt", weights_only=False)


def test_each_rank_writes_its_own_state_beside_the_file(written):
    written.results("write")  # the launch succeeded
    for name in ("average", "diloco", "ensemble"):
        section = _stored(written, name)["lightning_mpi"]
        assert section["world_size"] == WRITTEN_AT
        assert "ranks" not in section  # the main file holds one model, not one per rank
        shards = written.out / section["shards"]
        assert sorted(p.name for p in shards.iterdir()) == [f"rank-{r}.pt" for r in range(WRITTEN_AT)]


def test_top_k_removal_takes_the_ranks_directories_along_and_last_links_resume(written, resumed):
    directory = written.out / "topk"
    files = sorted(p.name for p in directory.iterdir())
    checkpoints = [f for f in files if f.endswith(".ckpt")]
    assert checkpoints == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"], files  # steps 2 and 4 gone
    assert (directory / "last.ckpt").is_symlink()
    shards = [f for f in files if ".ranks-" in f]
    assert sorted(s.split(".ranks-")[0] for s in shards) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"], files
    assert all(r["through_link_steps"] == STEPS for r in resumed)


@pytest.mark.parametrize("name", list(MODES))
def test_averaging_resumes_at_any_world_size_from_the_synchronised_model(written, resumed, name):
    stored = _stored(written, name)["state_dict"]
    world = resumed[0]["world"]
    for rank in resumed:
        got = rank[f"{name}_resumed"]
        if world == WRITTEN_AT:  # the same world size: each rank continues exactly where it was (its own model)
            continue
        for key, value in stored.items():
            assert torch.equal(got[key], value), f"{name} at {world} rank(s): {key} is not the synchronised model"
        assert rank[f"{name}_steps"] == STEPS + MORE
    first = resumed[0][f"{name}_trained"]
    for rank in resumed[1:]:  # replicas identical at the end of fit (averaged)
        assert all(torch.equal(rank[f"{name}_trained"][k], v) for k, v in first.items())


@pytest.mark.parametrize("resumed", [1], indirect=True, ids=["1rank"])  # the reference is one process
@pytest.mark.parametrize("name", list(MODES))
def test_at_one_rank_it_equals_a_single_device_trainer_resuming_the_same_file(written, resumed, name):
    assert resumed[0]["world"] == 1
    from lightning.pytorch import seed_everything

    seed_everything(0)
    model = _module()
    _trainer("auto", STEPS + MORE).fit(model, _loader(), ckpt_path=written.out / f"{name}.ckpt")
    got = resumed[0][f"{name}_trained"]
    if name == "average":  # the checkpoint's model and its optimizer state averaged over the ranks, then Adam
        for key, value in model.state_dict().items():
            assert torch.equal(got[key], value), key
    else:  # DiLoCo's outer step moves the model at the end of fit: trained on, it is not the plain Adam result
        assert any(not torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_ensemble_tests_at_any_world_size_with_every_member(written, resumed):
    from lightning_mpi import load_ensemble

    expected = written.results("write")[0]["test_loss"]
    for rank in resumed:
        assert abs(rank["ensemble_test_loss"] - expected) <= 1e-9
    # and one process without MPI: the mean of the members' outputs, the mean loss over the batches
    ensemble = load_ensemble(written.out / "ensemble.ckpt", lambda: _module())
    assert len(ensemble.members) == WRITTEN_AT
    x, y = _data().tensors
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(ensemble(x[i : i + 64]), y[i : i + 64]) for i in range(0, 512, 64)]
    assert abs(torch.stack(losses).mean().item() - expected) <= 1e-6


def test_ensemble_fit_resumes_only_at_its_world_size(resumed):
    world = resumed[0]["world"]
    for rank in resumed:
        if world == WRITTEN_AT:
            assert rank["ensemble_fit"] == "resumed"
        else:
            assert f"an ensemble of {WRITTEN_AT} member(s)" in rank["ensemble_fit"]
            assert f"the job runs {world} rank(s)" in rank["ensemble_fit"]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
