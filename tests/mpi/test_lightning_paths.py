"""Lightning paths that our first tests never walked, on real ranks (2 and 3), against outside references:
Lightning's DDPStrategy over gloo under the same mpirun, one process on the same samples, and README's promises.

The rank code comes first: ``main(OUT)`` runs on every rank within the suite's one launch per world size
(``python -m tests.mpi.suite OUT``, the ``suite_launches`` fixture); the assertions follow it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from tests.helpers import (
    BATCH,
    DigitClassifier,
    EnsembleRegressor,
    FixedOrder,
    LazyRegressor,
    RankShardedStream,
    Regressor,
    StepCollectives,
    ValidatedRegressor,
    digits_data,
    distributed_order,
    quiet_trainer,
    regression_data,
    run_scenarios,
    save_rank_results,
)


def gathered_max_diff(state: dict[str, torch.Tensor]) -> float:
    """The largest difference of any tensor of ``state`` between this rank and rank 0 (the same on every rank)."""
    comm = world()
    reference = comm.broadcast_object({k: v.detach().clone() for k, v in state.items()}, 0)
    mine = max(((state[k].double() - reference[k].double()).abs().max().item() for k in state), default=0.0)
    return max(comm.allgather_object(mine))


# -- buffers under gradient allreduce, against DDP over gloo ----------------------------------------------------


class BatchNormDigits(DigitClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, sync_dist=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)


def _fit_batchnorm(strategy: Any, **trainer_kwargs: Any) -> tuple[BatchNormDigits, Any]:
    seed_everything(0)
    model = BatchNormDigits(lr=0.1)
    train, val = digits_data()
    trainer = quiet_trainer(
        strategy=strategy, max_epochs=2, limit_train_batches=8, limit_val_batches=None, **trainer_kwargs
    )
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=50))
    return model, trainer


def batchnorm_vs_ddp(out: Path) -> None:
    """BatchNorm statistics follow rank 0 (DDP's broadcast_buffers): same parameters, buffers and logs as DDP."""
    comm = world()
    model, trainer = _fit_batchnorm(MPIStrategy())
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    spread = gathered_max_diff(ours)
    # The reference is DDP over gloo: MPIStrategy left its mpi4py process group (as DDP leaves its own), so DDP
    # would run over that one; it starts its gloo group once this one is gone, and goes with it afterwards.
    torch.distributed.destroy_process_group()
    model, trainer = _fit_batchnorm(DDPStrategy(process_group_backend="gloo"), devices=comm.size)
    assert torch.distributed.get_backend() == "gloo"
    torch.distributed.destroy_process_group()
    save_rank_results(
        out,
        "batchnorm_vs_ddp",
        {
            "ours": ours,
            "ddp": model.state_dict(),
            "logged": logged,
            "ddp_logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "spread": spread,
        },
    )


# -- averaging: checkpoints outside fit and during validation ----------------------------------------------------


def _fit_averaging(out: Path | None, epochs: int, resume: Path | None = None, **trainer_kwargs: Any) -> Any:
    comm = world()
    seed_everything(0)
    model = ValidatedRegressor(optimizer="adam", lr=0.02)
    callbacks = [ModelCheckpoint(dirpath=out, save_last=True, save_top_k=-1)] if out else []
    trainer = quiet_trainer(
        strategy=MPIStrategy(sync="average", every_n_steps=5),
        max_epochs=epochs,
        enable_checkpointing=bool(out),
        callbacks=callbacks,
        **{"limit_val_batches": None, **trainer_kwargs},
    )
    data = regression_data(6 * BATCH * comm.size)
    trainer.fit(
        model, DataLoader(data, batch_size=BATCH, shuffle=True), DataLoader(data, batch_size=BATCH), ckpt_path=resume
    )
    return model, trainer


def averaging_checkpoints(out: Path) -> None:
    """Outside fit a checkpoint is evaluated as the averaged model it holds; a checkpoint written during
    validation (check_val_every_n_epoch=2) resumes exactly."""
    comm = world()
    directory = out / f"average-ckpt-{comm.size}"
    # 6 steps per epoch, averaged every 5: at the end of epoch 0 (step 6) the ranks' models differ.
    _fit_averaging(directory / "train-end", epochs=1, limit_val_batches=0)
    checkpoint = directory / "train-end" / "epoch=0-step=6.ckpt"
    test_data = regression_data(40, seed=9)
    tested = quiet_trainer(strategy=MPIStrategy(sync="average", every_n_steps=5)).test(
        ValidatedRegressor(), DataLoader(test_data, batch_size=BATCH), ckpt_path=checkpoint, verbose=False
    )[0]
    averaged = ValidatedRegressor()
    averaged.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    with torch.no_grad():
        expected = nn.functional.mse_loss(averaged(test_data.tensors[0]), test_data.tensors[1]).item()
    # Validation every 2 epochs: ModelCheckpoint saves in on_validation_end, while the model is averaged for it.
    _fit_averaging(directory, epochs=2, check_val_every_n_epoch=2)
    checkpoint = directory / "epoch=1-step=12.ckpt"
    full, _ = _fit_averaging(None, epochs=4, check_val_every_n_epoch=2)
    resumed, trainer = _fit_averaging(None, epochs=4, resume=checkpoint, check_val_every_n_epoch=2)
    save_rank_results(
        out,
        "averaging_checkpoints",
        {
            "tested": tested["test_loss"],
            "expected": expected,
            "full": full.state_dict(),
            "resumed": resumed.state_dict(),
            "epoch": trainer.current_epoch,
        },
    )


# -- ensembles: voting that fits the outputs, second fits, structured outputs ---------------------------------


class TupleOutputs(EnsembleRegressor):
    def forward(self, x):
        out = self.net(x)
        return out, {"double": 2 * out}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x)[0], y)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class RecordStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = pl_module.net[0].weight.detach().clone()


def _ensemble_fit(model: LightningModule, voting: str, epochs: int = 1, **kwargs: Any) -> Any:
    comm = world()
    trainer = quiet_trainer(strategy=MPIStrategy(sync="ensemble", voting=voting), max_epochs=epochs, **kwargs)
    trainer.fit(model, DataLoader(regression_data(8 * BATCH * comm.size), batch_size=BATCH, shuffle=True))
    return trainer


def ensemble_paths(out: Path) -> None:
    """Hard voting refuses regression outputs on every rank; median is the true median; a second fit continues
    from the members; tuple and dict outputs are combined leaf by leaf."""
    comm = world()
    test = DataLoader(regression_data(20, seed=3), batch_size=BATCH)
    seed_everything(0)
    model = EnsembleRegressor()
    trainer = _ensemble_fit(model, "hard")
    try:
        trainer.test(model, test, verbose=False)
        refusal = None
    except ValueError as err:
        refusal = str(err)
    seed_everything(0)
    model = EnsembleRegressor()
    trainer = _ensemble_fit(model, "median")
    medians = torch.cat(trainer.predict(model, test))
    with torch.no_grad():
        members = torch.stack(comm.allgather(model(regression_data(20, seed=3).tensors[0])))
    after_first = model.net[0].weight.detach().clone()
    record = RecordStart()
    _ensemble_fit(model, "median", callbacks=[record])  # continue training the members
    seed_everything(0)
    structured = TupleOutputs()
    trainer = _ensemble_fit(structured, "mean")
    combined = trainer.predict(structured, test)
    with torch.no_grad():
        own = structured(regression_data(20, seed=3).tensors[0])
    save_rank_results(
        out,
        "ensemble_paths",
        {
            "refusal": refusal,
            "medians": medians,
            "members": members,
            "after_first": after_first,
            "second_start": record.weights,
            "combined": combined,
            "own": own,
            "member_outputs": trainer.strategy.member_outputs,
        },
    )


# -- evaluation: per-step collectives, iterable datasets ---------------------------------------------------------


def evaluation_paths(out: Path) -> None:
    comm = world()
    data = regression_data(9)  # batch 4: under plain unpadded shards, 2 ranks would run 2 and 1 batches
    seed_everything(0)
    module = StepCollectives()
    logged = quiet_trainer(strategy=MPIStrategy(timeout=30), limit_val_batches=None).validate(
        module, DataLoader(data, batch_size=4), verbose=False
    )[0]
    batches = comm.allgather_object(module.batches)
    assert len(set(batches)) == 1, f"ranks ran different numbers of evaluation batches: {batches}"
    seen = sum(comm.allgather_object(module.seen))
    assert seen == 9, f"{seen} samples evaluated instead of 9"
    stream = StepCollectives()
    streamed = quiet_trainer(strategy=MPIStrategy(timeout=30), limit_val_batches=None).validate(
        stream, DataLoader(RankShardedStream(regression_data(10)), batch_size=2), verbose=False
    )[0]
    save_rank_results(
        out,
        "evaluation_paths",
        {
            "logged": logged,
            "batches": batches,
            "streamed": streamed,
            "stream_seen": sum(comm.allgather_object(stream.seen)),
        },
    )


# -- exceptions raised on every rank ---------------------------------------------------------------------------


class FailsEverywhere(Regressor):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 2:
            raise ValueError("bad hyper-parameter, on every rank")
        return super().training_step(batch, batch_idx)


class SeesException(Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_exception(self, trainer, pl_module, exception):
        self.seen.append(type(exception).__name__)


def exceptions_everywhere(out: Path) -> None:
    """An exception on every rank propagates on every rank; on_exception callbacks run and the checkpoint saves."""
    comm = world()
    directory = out / f"on-exception-{comm.size}"
    seen = SeesException()
    checkpoints = ModelCheckpoint(dirpath=directory, save_on_exception=True, save_top_k=0)
    trainer = quiet_trainer(
        strategy=MPIStrategy(), max_epochs=3, enable_checkpointing=True, callbacks=[seen, checkpoints]
    )
    caught = None
    try:
        trainer.fit(FailsEverywhere(), DataLoader(regression_data(8 * BATCH * comm.size), batch_size=BATCH))
    except ValueError as err:
        caught = str(err)
    comm.barrier()
    files = sorted(p.name for p in directory.iterdir())
    # The job goes on: another fit on every rank works.
    again = quiet_trainer(strategy=MPIStrategy(), max_steps=2)
    again.fit(Regressor(), DataLoader(regression_data(8 * BATCH * comm.size), batch_size=BATCH))
    save_rank_results(
        out,
        "exceptions_everywhere",
        {"caught": caught, "seen": seen.seen, "files": files, "steps_after": again.global_step},
    )


# -- checkpoint IO plugins --------------------------------------------------------------------------------------


class KeepsCheckpointDict(Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.checkpoint = checkpoint


def checkpoint_io(out: Path) -> None:
    """Lightning's AsyncCheckpointIO writes the real path; callbacks' checkpoint dicts are not changed after."""
    comm = world()
    directory = out / f"async-{comm.size}"
    keeper = KeepsCheckpointDict()
    trainer = quiet_trainer(
        strategy=MPIStrategy(),
        max_epochs=2,
        enable_checkpointing=True,
        plugins=[AsyncCheckpointIO()],
        callbacks=[keeper, ModelCheckpoint(dirpath=directory, save_top_k=-1)],
    )
    model = Regressor()
    trainer.fit(model, DataLoader(regression_data(4 * BATCH * comm.size), batch_size=BATCH))
    comm.barrier()
    files = sorted(p.name for p in directory.iterdir())
    loaded = torch.load(directory / files[-1], weights_only=True)["state_dict"] if files else {}
    save_rank_results(
        out,
        "checkpoint_io",
        {"files": files, "loaded": loaded, "model": model.state_dict(), "keys_seen": sorted(keeper.checkpoint)},
    )


# -- lazy modules and sparse gradients ---------------------------------------------------------------------------


class SparseEmbedding(LightningModule):
    """An embedding bag with sparse gradients and SparseAdam, plus a dense head with Adam."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.embedding = nn.Embedding(50, 4, sparse=True)
        self.head = nn.Linear(4, 1)
        self.sparse_seen: list[bool] = []

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        sparse_opt, dense_opt = self.optimizers()
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss = nn.functional.mse_loss(self.head(self.embedding(tokens).mean(1)), y)
        self.manual_backward(loss)
        self.sparse_seen.append(self.embedding.weight.grad.is_sparse)
        sparse_opt.step()
        dense_opt.step()

    def configure_optimizers(self):
        return torch.optim.SparseAdam(self.embedding.parameters(), lr=0.05), torch.optim.Adam(
            self.head.parameters(), lr=0.05
        )


def token_data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 50, (n, 3), generator=g)
    return TensorDataset(tokens, tokens.float().mean(1, keepdim=True) / 50)


SPARSE_STEPS = 6


def lazy_and_sparse(out: Path) -> None:
    comm = world()
    seed_everything(int(comm.rank))  # lazy parameters materialise differently per rank: the strategy aligns them
    lazy = LazyRegressor()
    quiet_trainer(strategy=MPIStrategy(), max_steps=4).fit(
        lazy, DataLoader(regression_data(4 * BATCH * comm.size), batch_size=BATCH)
    )
    seed_everything(0)
    sparse = SparseEmbedding()
    data = token_data(SPARSE_STEPS * BATCH * comm.size)
    quiet_trainer(strategy=MPIStrategy(), max_steps=SPARSE_STEPS).fit(sparse, DataLoader(data, batch_size=BATCH))
    save_rank_results(
        out,
        "lazy_and_sparse",
        {
            "lazy": lazy.state_dict(),
            "lazy_spread": gathered_max_diff(lazy.state_dict()),
            "sparse": sparse.state_dict(),
            "sparse_seen": sparse.sparse_seen,
        },
    )


# -- uneven training inputs ----------------------------------------------------------------------------------


def uneven_shards(world_size: int) -> list[list[int]]:
    """Rank r's samples: a contiguous block of (3 + r) batches (so ranks run out one batch apart)."""
    shards, start = [], 0
    for r in range(world_size):
        shards.append(list(range(start, start + (3 + r) * BATCH)))
        start += (3 + r) * BATCH
    return shards


def uneven_data(world_size: int) -> TensorDataset:
    return regression_data(sum(len(s) for s in uneven_shards(world_size)), seed=6)


class ShardStream(IterableDataset):
    """The user's own sharding, without a length: rank r streams its shard."""

    def __init__(self, data: TensorDataset, indices: list[int]) -> None:
        self.data, self.indices = data, indices

    def __iter__(self):
        return (self.data[i] for i in self.indices)


class StepLogger(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("step_loss", loss, on_step=True, sync_dist=True)
        return loss


UNEVEN_EPOCHS = 2


def _fit_uneven(model: LightningModule, loader: DataLoader, **strategy_kwargs: Any) -> Any:
    trainer = quiet_trainer(
        strategy=MPIStrategy(timeout=30, **strategy_kwargs),
        max_epochs=UNEVEN_EPOCHS,
        use_distributed_sampler=False,
        limit_val_batches=None,
    )
    validated = isinstance(model, ValidatedRegressor)
    trainer.fit(model, loader, DataLoader(regression_data(12, seed=8), batch_size=BATCH) if validated else None)
    return trainer


def _refusal(model: LightningModule, loader: DataLoader) -> str | None:
    try:
        _fit_uneven(model, loader)
    except RuntimeError as err:
        return str(err)
    return None


def uneven_inputs(out: Path) -> None:
    """Ranks with fewer batches join the others: every rank finishes each epoch together, gradients averaged
    over the ranks that had data; what cannot be bridged is an error on every rank."""
    comm = world()
    data = uneven_data(comm.size)
    shard = torch.utils.data.Subset(data, uneven_shards(comm.size)[comm.rank])
    results: dict[str, Any] = {}
    for name, loader in (
        ("sized", DataLoader(shard, batch_size=BATCH)),
        ("stream", DataLoader(ShardStream(data, uneven_shards(comm.size)[comm.rank]), batch_size=BATCH)),
    ):
        seed_everything(0)
        model = ValidatedRegressor()
        trainer = _fit_uneven(model, loader)
        results[name] = {
            "state": model.state_dict(),
            "spread": gathered_max_diff(model.state_dict()),
            "steps": comm.allgather_object(trainer.global_step),
            "val_loss": float(trainer.callback_metrics["val_loss"]),
        }
    seed_everything(0)
    averaged = ValidatedRegressor()
    _fit_uneven(averaged, DataLoader(shard, batch_size=BATCH), sync="average", every_n_steps=2)
    results["average_spread"] = gathered_max_diff(averaged.state_dict())
    results["step_collective"] = _refusal(StepLogger(), DataLoader(shard, batch_size=BATCH))
    results["manual"] = _refusal(Regressor(manual=True), DataLoader(shard, batch_size=BATCH))
    save_rank_results(out, "uneven_inputs", results)


SCENARIOS = {
    f.__name__: f
    for f in (
        batchnorm_vs_ddp,
        averaging_checkpoints,
        ensemble_paths,
        evaluation_paths,
        exceptions_everywhere,
        checkpoint_io,
        lazy_and_sparse,
        uneven_inputs,
    )
}


def main(out: Path, names: list[str]) -> None:
    run_scenarios(SCENARIOS, out, names)


# -- the assertions -------------------------------------------------------------------------------------------


pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_batchnorm_buffers_follow_rank_zero_like_ddp(suite_launch):
    for rank in suite_launch.results("batchnorm_vs_ddp"):
        assert rank["spread"] == 0.0, "parameters or BatchNorm statistics differ between ranks"
        assert max_diff(rank["ours"], rank["ddp"]) <= 1e-5  # parameters and running statistics equal DDP's
        for name in ("val_loss", "train_loss"):
            assert rank["logged"][name] == pytest.approx(rank["ddp_logged"][name], rel=1e-5), name


def test_averaging_checkpoint_is_evaluated_as_the_averaged_model(suite_launch):
    for rank in suite_launch.results("averaging_checkpoints"):
        assert rank["tested"] == pytest.approx(rank["expected"], rel=1e-6)


def test_averaging_resume_from_a_checkpoint_written_during_validation_is_exact(suite_launch):
    for rank in suite_launch.results("averaging_checkpoints"):
        assert rank["epoch"] == 4
        assert max_diff(rank["full"], rank["resumed"]) == 0.0


def test_hard_voting_refuses_regression_outputs_on_every_rank(suite_launch):
    for rank in suite_launch.results("ensemble_paths"):
        assert rank["refusal"] is not None
        assert "voting='hard' combines class scores" in rank["refusal"]
        assert "voting='mean'" in rank["refusal"]


def test_median_voting_is_the_true_median(suite_launch):
    world = suite_launch.world
    for rank in suite_launch.results("ensemble_paths"):
        members = rank["members"]
        ordered = members.sort(dim=0).values
        middle = world // 2
        expected = ordered[middle] if world % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        assert torch.allclose(rank["medians"], expected, atol=1e-7)


def test_second_ensemble_fit_continues_from_the_members(suite_launch):
    ranks = suite_launch.results("ensemble_paths")
    for rank in ranks:
        assert torch.equal(rank["second_start"], rank["after_first"])
    assert not torch.equal(ranks[0]["after_first"], ranks[1]["after_first"]), "members should differ"


def test_ensemble_combines_tuple_and_dict_outputs(suite_launch):
    ranks = suite_launch.results("ensemble_paths")
    own = [r["own"] for r in ranks]
    expected_main = torch.stack([o[0] for o in own]).mean(0)
    expected_double = torch.stack([o[1]["double"] for o in own]).mean(0)
    for rank in ranks:
        main = torch.cat([batch[0] for batch in rank["combined"]])
        double = torch.cat([batch[1]["double"] for batch in rank["combined"]])
        assert torch.allclose(main, expected_main, atol=1e-6)
        assert torch.allclose(double, expected_double, atol=1e-6)
        assert rank["member_outputs"][0].shape[0] == len(ranks)  # members stacked per leaf


def test_per_step_collectives_in_evaluation_with_uneven_shards(suite_launch):
    world = suite_launch.world
    seed_everything(0)
    reference = StepCollectives()
    expected = quiet_trainer(devices=1, limit_val_batches=None).validate(
        reference, DataLoader(regression_data(9), batch_size=4), verbose=False
    )[0]
    for rank in suite_launch.results("evaluation_paths"):
        assert len(set(rank["batches"])) == 1
        assert len(rank["batches"]) == world
        assert rank["logged"]["val_count"] == 9
        assert rank["logged"]["gathered_count"] == 9
        assert rank["logged"]["val_step_loss_epoch"] == pytest.approx(expected["val_step_loss_epoch"], rel=1e-6)


def test_iterable_validation_dataset_is_left_to_the_user_to_shard(suite_launch):
    for rank in suite_launch.results("evaluation_paths"):
        assert rank["stream_seen"] == 10
        assert rank["streamed"]["val_count"] == 10


def test_exception_on_every_rank_propagates_and_runs_on_exception_callbacks(suite_launch):
    for rank in suite_launch.results("exceptions_everywhere"):
        assert rank["caught"] == "bad hyper-parameter, on every rank"
        assert rank["seen"] == ["ValueError"]
        assert rank["files"] == ["epoch=1-step=10.ckpt"]  # ModelCheckpoint(save_on_exception=True) saved once
        assert rank["steps_after"] == 2  # and the job goes on


def test_async_checkpoint_io_writes_and_callbacks_keep_their_dict(suite_launch):
    for rank in suite_launch.results("checkpoint_io"):
        assert rank["files"] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
        assert max_diff(rank["loaded"], rank["model"]) == 0.0
        assert "lightning_mpi" not in rank["keys_seen"]


def test_lazy_modules_are_identical_on_every_rank(suite_launch):
    for rank in suite_launch.results("lazy_and_sparse"):
        assert rank["lazy_spread"] == 0.0
        assert all(torch.isfinite(v).all() for v in rank["lazy"].values())


def test_sparse_gradients_stay_sparse_and_equal_one_process(suite_launch):
    world = suite_launch.world
    seed_everything(0)
    reference = SparseEmbedding()
    data = token_data(SPARSE_STEPS * BATCH * world)
    order = distributed_order(len(data), world, BATCH)
    quiet_trainer(devices=1, max_steps=SPARSE_STEPS).fit(
        reference, DataLoader(data, batch_size=world * BATCH, sampler=FixedOrder(order))
    )
    for rank in suite_launch.results("lazy_and_sparse"):
        assert rank["sparse_seen"]
        assert all(rank["sparse_seen"])
        assert max_diff(rank["sparse"], reference.state_dict()) <= 1e-5


def uneven_reference(world: int) -> tuple[dict, float]:
    """One process: step k trains on the k-th batches of the ranks that still have one, concatenated."""
    shards = uneven_shards(world)
    batches = []
    for k in range(max(len(s) for s in shards) // BATCH):
        batches.append([i for s in shards for i in s[k * BATCH : (k + 1) * BATCH]])
    seed_everything(0)
    model = ValidatedRegressor()
    trainer = quiet_trainer(devices=1, max_epochs=UNEVEN_EPOCHS, limit_val_batches=None)
    trainer.fit(
        model,
        DataLoader(uneven_data(world), batch_sampler=batches),
        DataLoader(regression_data(12, seed=8), batch_size=BATCH),
    )
    return model.state_dict(), float(trainer.callback_metrics["val_loss"])


def test_uneven_inputs_are_bridged_and_equal_one_process(suite_launch):
    world = suite_launch.world
    expected, expected_val = uneven_reference(world)
    steps = UNEVEN_EPOCHS * (3 + world - 1)  # the longest shard sets the pace
    for rank in suite_launch.results("uneven_inputs"):
        for loader in ("sized", "stream"):
            run = rank[loader]
            assert run["steps"] == [steps] * world, f"{loader}: ranks ended at different steps"
            assert run["spread"] == 0.0, f"{loader}: replicas differ"
            assert max_diff(run["state"], expected) <= 1e-5, loader
            assert run["val_loss"] == pytest.approx(expected_val, rel=1e-5), loader
        assert rank["average_spread"] == 0.0


def test_uneven_inputs_that_cannot_be_bridged_fail_on_every_rank(suite_launch):
    for rank in suite_launch.results("uneven_inputs"):
        assert rank["step_collective"].startswith("Uneven inputs: ranks [0")
        assert "The ranks called different collectives here" in rank["step_collective"]
        assert "Under manual optimization" in rank["manual"]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
