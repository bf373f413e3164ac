"""Without mpirun, MPIStrategy is a single-device Trainer: same parameters, same logs, no MPI."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.policies import ParameterAveraging
from tests.helpers import BATCH, build, quiet_trainer, regression_data


def train(strategy) -> tuple[dict[str, torch.Tensor], Trainer]:
    model, dtype, trainer_kwargs = build("adam_clip", log_rank=True)
    trainer = quiet_trainer(max_epochs=2, strategy=strategy, **trainer_kwargs)
    trainer.fit(model, DataLoader(regression_data(10 * BATCH, dtype), batch_size=BATCH, shuffle=True))
    return model.state_dict(), trainer


def test_world_size_one_equals_single_device_trainer():
    expected, plain = train("auto")
    got, ours = train(MPIStrategy())
    assert isinstance(ours.strategy, MPIStrategy)
    assert ours.world_size == 1
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert ours.callback_metrics["rank_mean"] == plain.callback_metrics["rank_mean"] == 0


def test_registered_name():
    trainer = Trainer(strategy="mpi", accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, MPIStrategy)


def test_clear_errors_for_bad_arguments():
    import pytest

    with pytest.raises(
        ValueError,
        match=r"every_n_steps is not an option of MPIStrategy\(sync='allreduce'\) "
        r"\(GradientAllreduce takes bucket_mb, overlap\); it belongs to sync='average'",
    ):
        MPIStrategy(every_n_steps=3)
    with pytest.raises(ValueError, match="voting is not an option of .*it belongs to sync='ensemble'"):
        MPIStrategy(voting="soft")
    with pytest.raises(ValueError, match=r"overlap is not an option of MPIStrategy\(sync='average'\)"):
        MPIStrategy("average", overlap=True)
    with pytest.raises(ValueError, match="bucket_size is not an option .*no mode takes it"):
        MPIStrategy(bucket_size=3)
    with pytest.raises(ValueError, match="choose one of 'allreduce', 'average', 'ensemble'"):
        MPIStrategy(sync="gossip")
    with pytest.raises(ValueError, match="voting='majority' is not known"):
        MPIStrategy(sync="ensemble", voting="majority")
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        MPIStrategy(sync="average", every_n_steps=0)
    with pytest.raises(ValueError, match="give them to ParameterAveraging"):
        MPIStrategy(ParameterAveraging(every_n_steps=2), every_n_steps=3)


def test_a_policy_object_is_the_same_as_its_name_and_options():
    policy = ParameterAveraging(every_n_steps=4, warmup_steps=2)
    assert MPIStrategy(policy).policy is policy
    named = MPIStrategy("average", every_n_steps=4, warmup_steps=2).policy
    assert isinstance(named, ParameterAveraging)
    assert (named.every_n_steps, named.warmup_steps) == (policy.every_n_steps, policy.warmup_steps)


def test_every_option_has_one_owner_and_the_hydra_schema_follows_the_signatures():
    """The option list exists once, in the policies' signatures: MPIStrategy forwards them, and the Hydra schema's
    fields are exactly the strategy's own arguments plus every policy's options."""
    import dataclasses
    import inspect

    from lightning_mpi.hydra import MPIStrategyConfig
    from lightning_mpi.policies import POLICIES, options_of

    strategy_args = [
        p.name
        for p in inspect.signature(MPIStrategy.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY or p.name == "sync"
    ]
    policy_options = {option for policy in POLICIES.values() for option in options_of(policy)}
    assert not policy_options & set(strategy_args)
    schema = {f.name for f in dataclasses.fields(MPIStrategyConfig)} - {"_target_"}
    not_for_hydra = {"communicator", "accelerator", "checkpoint_io", "precision_plugin"}  # objects, not configuration
    assert schema == (set(strategy_args) - not_for_hydra) | policy_options


def test_timeout_is_validated():
    import pytest

    for bad in (-1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="timeout=.* is not valid"):
            MPIStrategy(timeout=bad)
    for no_stall_detection in (0, None):
        MPIStrategy(timeout=no_stall_detection)


def test_bucket_mb_is_validated():
    import pytest

    for sync in ("allreduce", "average"):
        for bad in (-1, 0, float("nan"), float("inf"), "25", True):
            with pytest.raises(ValueError, match="bucket_mb=.* is not valid"):
                MPIStrategy(sync=sync, bucket_mb=bad)
        MPIStrategy(sync=sync, bucket_mb=0.5)


def _two_fits(strategy_factory) -> tuple[dict[str, torch.Tensor], float]:
    """Fit, then fit again (fine-tuning) with a new Trainer: the second fit continues from the first."""
    from tests.helpers import EnsembleRegressor

    seed_everything(0)
    model = EnsembleRegressor()
    for epochs in (2, 1):
        trainer = quiet_trainer(max_epochs=epochs, strategy=strategy_factory())
        trainer.fit(model, DataLoader(regression_data(10 * BATCH), batch_size=BATCH, shuffle=True))
    tested = trainer.test(model, DataLoader(regression_data(20, seed=3), batch_size=BATCH), verbose=False)[0]
    return model.state_dict(), tested["test_loss"]


def test_ensemble_at_world_size_one_is_a_single_device_trainer_also_for_a_second_fit():
    expected, expected_loss = _two_fits(lambda: "auto")
    got, loss = _two_fits(lambda: MPIStrategy(sync="ensemble", voting="mean"))
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert loss == expected_loss


ITERABLE_VALIDATION = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))  # an infinite sampler turned into a list fails fast
from torch.utils.data import DataLoader
from lightning_mpi import MPIStrategy
from tests.helpers import quiet_trainer, regression_data
from tests.helpers import RankShardedStream, StepCollectives
module = StepCollectives()
stream = DataLoader(RankShardedStream(regression_data(10)), batch_size=3)
logged = quiet_trainer(strategy=MPIStrategy(), limit_val_batches=None).validate(module, stream, verbose=False)[0]
print("validated", logged["val_count"], module.batches)
"""


def test_iterable_validation_dataset_in_one_process():
    import subprocess
    import sys

    from tests.mpirun import ROOT

    result = subprocess.run(
        [sys.executable, "-c", ITERABLE_VALIDATION], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "validated 10.0 4" in result.stdout, result.stderr[-2000:]


def test_batch_hooks_wrapped_on_the_instance_are_called():
    from unittest.mock import Mock

    model, _, _ = build("sgd_momentum")
    model.transfer_batch_to_device = Mock(wraps=model.transfer_batch_to_device)
    model.on_after_batch_transfer = Mock(wraps=model.on_after_batch_transfer)
    quiet_trainer(max_steps=3, strategy=MPIStrategy()).fit(
        model, DataLoader(regression_data(4 * BATCH), batch_size=BATCH)
    )
    assert model.transfer_batch_to_device.call_count == 3
    assert model.on_after_batch_transfer.call_count == 3


def test_lazy_modules_in_one_process():
    from tests.helpers import LazyRegressor

    seed_everything(0)
    expected = LazyRegressor()
    quiet_trainer(max_steps=3, devices=1).fit(expected, DataLoader(regression_data(4 * BATCH), batch_size=BATCH))
    seed_everything(0)
    got = LazyRegressor()
    quiet_trainer(max_steps=3, strategy=MPIStrategy()).fit(
        got, DataLoader(regression_data(4 * BATCH), batch_size=BATCH)
    )
    for name, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[name], value), name


class _RunsCode:
    """A pickled object that runs code when unpickled (here: it creates a file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_ensemble_refuses_checkpoints_that_run_code(tmp_path):
    import pickle

    import pytest

    from lightning_mpi import load_ensemble
    from tests.helpers import Regressor

    member = Regressor().state_dict()
    checkpoint = {
        "lightning_mpi": {"sync": "ensemble", "ranks": [{"state_dict": member}], "policy": {"voting": "mean"}},
        "hyper_parameters": {},
    }
    torch.save(checkpoint, tmp_path / "fine.ckpt")
    assert len(load_ensemble(tmp_path / "fine.ckpt", Regressor).members) == 1
    marker = tmp_path / "code-ran"
    checkpoint["hyper_parameters"] = {"note": _RunsCode(str(marker))}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_ensemble(tmp_path / "evil.ckpt", Regressor)
    assert not marker.exists(), "loading ran code from the checkpoint"
    with pytest.raises(TypeError):  # opting out loads everything: the object ran (and is no hyper-parameter)
        load_ensemble(tmp_path / "evil.ckpt", Regressor, weights_only=False)
    assert marker.exists()


def test_diloco_fit_ends_on_its_last_outer_step():
    # A fit whose last optimizer step was a synchronisation is in sync: one more outer step on zero changes would
    # still move the parameters (Nesterov's momentum).
    import functools

    from lightning.pytorch import Callback

    class LastStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.parameters = {k: v.clone() for k, v in pl_module.state_dict().items()}

    seed_everything(0)
    model, _, _ = build("sgd_momentum")
    nesterov = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
    strategy = MPIStrategy(sync="average", every_n_steps=4, outer_optimizer=nesterov)
    last = LastStep()
    trainer = quiet_trainer(max_steps=8, strategy=strategy, callbacks=[last])
    trainer.fit(model, DataLoader(regression_data(8 * BATCH), batch_size=BATCH))
    assert strategy.policy.averagings == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, last.parameters[name]), name


def test_loading_an_ensemble_checkpoint_under_another_mode_warns(tmp_path):
    import pytest
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    def trainer(sync: str) -> Trainer:
        return Trainer(
            strategy=MPIStrategy(sync=sync),
            max_steps=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )

    model = BoringModel()
    fitting = trainer("ensemble")
    fitting.fit(model)
    fitting.save_checkpoint(tmp_path / "ensemble.ckpt")
    with pytest.warns(UserWarning, match="is an ensemble checkpoint of 1 member.*member 0 alone"):
        trainer("allreduce").test(BoringModel(), ckpt_path=tmp_path / "ensemble.ckpt", verbose=False)


def test_checkpoint_section_has_a_format_version(tmp_path):
    """The strategy's checkpoint section carries the format it was written in; files without one (written before
    the number) load as version 1, a newer format is refused naming the fix."""
    import pytest

    from lightning_mpi.checkpoint import FORMAT_VERSION, SECTION, checkpoint_section
    from tests.helpers import Regressor

    seed_everything(0)
    trainer = quiet_trainer(strategy=MPIStrategy("average", every_n_steps=1), max_steps=2)
    trainer.fit(Regressor(), DataLoader(regression_data(4 * BATCH), batch_size=BATCH))
    path = tmp_path / "average.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=False)
    assert stored[SECTION]["format"] == FORMAT_VERSION == 2
    assert checkpoint_section({SECTION: {"sync": "average"}}) == {"sync": "average"}
    assert checkpoint_section({}) == {}
    with pytest.raises(ValueError, match="format 3, newer than the format 2 this version reads: upgrade"):
        checkpoint_section({SECTION: {"format": 3}}, path)
    trainer = quiet_trainer(strategy=MPIStrategy("average", every_n_steps=1), max_steps=3)
    trainer.fit(Regressor(), DataLoader(regression_data(4 * BATCH), batch_size=BATCH), ckpt_path=path)
    assert trainer.strategy.policy.steps == 3
