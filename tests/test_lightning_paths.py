"""Lightning paths that our first tests never walked, on real ranks (2 and 3), against outside references:
Lightning's DDPStrategy over gloo under the same mpirun, one process on the same samples, and README's promises.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from tests.helpers import BATCH, FixedOrder, distributed_order, quiet_trainer, regression_data
from tests.mpirun import Launch
from tests.scenarios import lightning_paths as paths

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, suite_launches) -> Launch:
    return suite_launches(request.param)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_batchnorm_buffers_follow_rank_zero_like_ddp(launched):
    for rank in launched.results("batchnorm_vs_ddp"):
        assert rank["spread"] == 0.0, "parameters or BatchNorm statistics differ between ranks"
        assert max_diff(rank["ours"], rank["ddp"]) <= 1e-5  # parameters and running statistics equal DDP's
        for name in ("val_loss", "train_loss"):
            assert rank["logged"][name] == pytest.approx(rank["ddp_logged"][name], rel=1e-5), name


def test_averaging_checkpoint_is_evaluated_as_the_averaged_model(launched):
    for rank in launched.results("averaging_checkpoints"):
        assert rank["tested"] == pytest.approx(rank["expected"], rel=1e-6)


def test_averaging_resume_from_a_checkpoint_written_during_validation_is_exact(launched):
    for rank in launched.results("averaging_checkpoints"):
        assert rank["epoch"] == 4
        assert max_diff(rank["full"], rank["resumed"]) == 0.0


def test_hard_voting_refuses_regression_outputs_on_every_rank(launched):
    for rank in launched.results("ensemble_paths"):
        assert rank["refusal"] is not None
        assert "voting='hard' combines class scores" in rank["refusal"]
        assert "voting='mean'" in rank["refusal"]


def test_median_voting_is_the_true_median(launched):
    world = launched.world
    for rank in launched.results("ensemble_paths"):
        members = rank["members"]
        ordered = members.sort(dim=0).values
        middle = world // 2
        expected = ordered[middle] if world % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        assert torch.allclose(rank["medians"], expected, atol=1e-7)


def test_second_ensemble_fit_continues_from_the_members(launched):
    ranks = launched.results("ensemble_paths")
    for rank in ranks:
        assert torch.equal(rank["second_start"], rank["after_first"])
    assert not torch.equal(ranks[0]["after_first"], ranks[1]["after_first"]), "members should differ"


def test_ensemble_combines_tuple_and_dict_outputs(launched):
    ranks = launched.results("ensemble_paths")
    own = [r["own"] for r in ranks]
    expected_main = torch.stack([o[0] for o in own]).mean(0)
    expected_double = torch.stack([o[1]["double"] for o in own]).mean(0)
    for rank in ranks:
        main = torch.cat([batch[0] for batch in rank["combined"]])
        double = torch.cat([batch[1]["double"] for batch in rank["combined"]])
        assert torch.allclose(main, expected_main, atol=1e-6)
        assert torch.allclose(double, expected_double, atol=1e-6)
        assert rank["member_outputs"][0].shape[0] == len(ranks)  # members stacked per leaf


def test_per_step_collectives_in_evaluation_with_uneven_shards(launched):
    world = launched.world
    seed_everything(0)
    reference = paths.StepCollectives()
    expected = quiet_trainer(devices=1, limit_val_batches=None).validate(
        reference, DataLoader(regression_data(9), batch_size=4), verbose=False
    )[0]
    for rank in launched.results("evaluation_paths"):
        assert len(set(rank["batches"])) == 1
        assert len(rank["batches"]) == world
        assert rank["logged"]["val_count"] == 9
        assert rank["logged"]["gathered_count"] == 9
        assert rank["logged"]["val_step_loss_epoch"] == pytest.approx(expected["val_step_loss_epoch"], rel=1e-6)


def test_iterable_validation_dataset_is_left_to_the_user_to_shard(launched):
    for rank in launched.results("evaluation_paths"):
        assert rank["stream_seen"] == 10
        assert rank["streamed"]["val_count"] == 10


def test_exception_on_every_rank_propagates_and_runs_on_exception_callbacks(launched):
    for rank in launched.results("exceptions_everywhere"):
        assert rank["caught"] == "bad hyper-parameter, on every rank"
        assert rank["seen"] == ["ValueError"]
        assert rank["files"] == ["epoch=1-step=10.ckpt"]  # ModelCheckpoint(save_on_exception=True) saved once
        assert rank["steps_after"] == 2  # and the job goes on


def test_async_checkpoint_io_writes_and_callbacks_keep_their_dict(launched):
    for rank in launched.results("checkpoint_io"):
        assert rank["files"] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
        assert max_diff(rank["loaded"], rank["model"]) == 0.0
        assert "lightning_mpi" not in rank["keys_seen"]


def test_lazy_modules_are_identical_on_every_rank(launched):
    for rank in launched.results("lazy_and_sparse"):
        assert rank["lazy_spread"] == 0.0
        assert all(torch.isfinite(v).all() for v in rank["lazy"].values())


def test_sparse_gradients_stay_sparse_and_equal_one_process(launched):
    world = launched.world
    seed_everything(0)
    reference = paths.SparseEmbedding()
    data = paths.token_data(paths.SPARSE_STEPS * BATCH * world)
    order = distributed_order(len(data), world, BATCH)
    quiet_trainer(devices=1, max_steps=paths.SPARSE_STEPS).fit(
        reference, DataLoader(data, batch_size=world * BATCH, sampler=FixedOrder(order))
    )
    for rank in launched.results("lazy_and_sparse"):
        assert rank["sparse_seen"]
        assert all(rank["sparse_seen"])
        assert max_diff(rank["sparse"], reference.state_dict()) <= 1e-5


def uneven_reference(world: int) -> tuple[dict, float]:
    """One process: step k trains on the k-th batches of the ranks that still have one, concatenated."""
    shards = paths.uneven_shards(world)
    batches = []
    for k in range(max(len(s) for s in shards) // BATCH):
        batches.append([i for s in shards for i in s[k * BATCH : (k + 1) * BATCH]])
    seed_everything(0)
    model = paths.ValidatedRegressor()
    trainer = quiet_trainer(devices=1, max_epochs=paths.UNEVEN_EPOCHS, limit_val_batches=None)
    trainer.fit(
        model,
        DataLoader(paths.uneven_data(world), batch_sampler=batches),
        DataLoader(regression_data(12, seed=8), batch_size=BATCH),
    )
    return model.state_dict(), float(trainer.callback_metrics["val_loss"])


def test_uneven_inputs_are_bridged_and_equal_one_process(launched):
    world = launched.world
    expected, expected_val = uneven_reference(world)
    steps = paths.UNEVEN_EPOCHS * (3 + world - 1)  # the longest shard sets the pace
    for rank in launched.results("uneven_inputs"):
        for loader in ("sized", "stream"):
            run = rank[loader]
            assert run["steps"] == [steps] * world, f"{loader}: ranks ended at different steps"
            assert run["spread"] == 0.0, f"{loader}: replicas differ"
            assert max_diff(run["state"], expected) <= 1e-5, loader
            assert run["val_loss"] == pytest.approx(expected_val, rel=1e-5), loader
        assert rank["average_spread"] == 0.0


def test_uneven_inputs_that_cannot_be_bridged_fail_on_every_rank(launched):
    for rank in launched.results("uneven_inputs"):
        assert rank["step_collective"].startswith("Uneven inputs: ranks [0")
        assert "The ranks called different collectives here" in rank["step_collective"]
        assert "Under manual optimization" in rank["manual"]
