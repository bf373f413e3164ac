"""The Lightning internals of lightning_mpi/_lightning.py still exist and mean what we use them for.

A Lightning release that renames or reshapes one of them fails here, not silently in a multi-rank run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from functools import partial
from unittest.mock import Mock

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper, _IndexBatchSamplerWrapper
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from lightning_mpi import _lightning
from lightning_mpi.comm import LAUNCHER_VARIABLES
from tests.helpers import BATCH, Regressor, quiet_trainer, regression_data
from tests.mpirun import ROOT


def test_request_stop_is_what_lightning_reads_as_a_received_sigterm():
    trainer = Trainer(accelerator="cpu", logger=False)
    assert not trainer.received_sigterm
    _lightning.request_stop(trainer)
    assert trainer.received_sigterm


def test_trainer_flags_read_from_the_accelerator_connector():
    assert _lightning.uses_distributed_sampler(Trainer(accelerator="cpu", logger=False))
    assert not _lightning.uses_distributed_sampler(
        Trainer(accelerator="cpu", logger=False, use_distributed_sampler=False)
    )
    assert not _lightning.trainer_builds_distributed(Trainer(accelerator="cpu", logger=False))


def test_cached_predictions_are_the_predict_loops_per_dataloader_lists():
    trainer = quiet_trainer(strategy=SingleDeviceStrategy("cpu"))
    module = Regressor()
    module.predict_step = lambda batch, batch_idx: module(batch[0])
    returned = trainer.predict(module, DataLoader(regression_data(3 * BATCH), batch_size=BATCH))
    cached = _lightning.cached_predictions(trainer)
    assert len(cached) == 1
    assert len(cached[0]) == 3
    assert all(torch.equal(a, b) for a, b in zip(returned, cached[0]))


def test_samplers_inside_lightnings_wrappers():
    inner = SequentialSampler(range(5))
    for wrapper_class in (DistributedSamplerWrapper, UnrepeatedDistributedSamplerWrapper):
        assert _lightning.sampler_inside_wrapper(wrapper_class(inner, num_replicas=1, rank=0)) is inner
    assert _lightning.sampler_inside_wrapper(inner) is None
    batches = BatchSampler(inner, batch_size=2, drop_last=False)
    wrapper = _IndexBatchSamplerWrapper(batches)
    assert _lightning.batch_sampler_inside_wrapper(wrapper) is batches
    assert _lightning.batch_sampler_inside_wrapper(batches) is batches
    _lightning.replace_batch_sampler_inside_wrapper(wrapper, [[4], [3]])
    assert list(wrapper) == [[4], [3]]
    assert len(wrapper) == 2


def test_attached_trainer():
    module = Regressor()
    assert _lightning.attached_trainer(module) is None
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader(regression_data(BATCH), batch_size=BATCH))
    assert _lightning.attached_trainer(module) is trainer


def test_lightning_default_hooks_and_replacements_on_the_instance():
    module = Regressor()
    hook = "transfer_batch_to_device"
    assert _lightning.is_lightning_default(module, LightningModule, hook)
    for replacement in (Mock(wraps=getattr(module, hook)), partial(getattr(module, hook))):
        setattr(module, hook, replacement)
        assert not _lightning.is_lightning_default(module, LightningModule, hook)

    class Overriding(Regressor):
        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch

    assert not _lightning.is_lightning_default(Overriding(), LightningModule, hook)


def test_after_every_trainer_init_runs_once_per_trainer_with_the_arguments_as_given():
    seen: list[tuple[Trainer, dict]] = []

    def record(trainer: Trainer, arguments: dict) -> None:
        seen.append((trainer, arguments))

    from lightning.pytorch.callbacks import Callback

    original = Trainer.__init__
    given = Callback()
    mine = [given]
    try:
        _lightning.after_every_trainer_init(record)
        _lightning.after_every_trainer_init(record)  # idempotent: installed once
        trainer = Trainer(accelerator="cpu", logger=False, callbacks=mine)
        assert [t for t, _ in seen] == [trainer]
        # Lightning appends its default callbacks to the list it was given; the check sees the list as given
        assert seen[0][1]["callbacks"] == [given]
        assert trainer.progress_bar_callback in mine
    finally:
        Trainer.__init__ = original
        _lightning._AFTER_INIT.remove(record)


def _without_launcher(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith(("OMPI_", "PMIX_"))}
    env.update({"PYTHONPATH": str(ROOT), **extra})
    return env


def test_trainers_ask_lightnings_mpi_environment_which_answers_false_without_a_launcher(monkeypatch) -> None:
    from lightning.fabric.plugins.environments import MPIEnvironment

    assert getattr(MPIEnvironment.detect, "lightning_mpi", False)  # installed by `import lightning_mpi`
    _lightning.keep_one_process_runs_away_from_mpi()  # idempotent
    assert not getattr(MPIEnvironment.detect.__wrapped__, "lightning_mpi", False)
    asked: list[bool] = []
    patched = MPIEnvironment.detect
    monkeypatch.setattr(MPIEnvironment, "detect", staticmethod(lambda: asked.append(patched()) or False))
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    Trainer(accelerator="cpu", logger=False)
    assert asked == [False]  # every Trainer asks; without a launcher the answer needs no MPI library


def test_without_an_mpi_library_one_process_never_loads_one_and_a_launchers_process_still_asks_mpi() -> None:
    nowhere = {"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}  # mpi4py installed, no MPI library it can load
    trainer = "from lightning.pytorch import Trainer; Trainer(accelerator='cpu', logger=False); "
    code = "import sys, lightning_mpi; " + trainer + "print('mpi4py.MPI' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], env=_without_launcher(nowhere), capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1] == "False", run.stderr
    # what it prevents: Lightning alone loads MPI in every Trainer() (if this passes one day, the patch can go)
    run = subprocess.run([sys.executable, "-c", trainer], env=_without_launcher(nowhere), capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode != 0
    assert "cannot load MPI library" in run.stderr
    # under a launcher Lightning's own detection runs (DDPStrategy under mpirun relies on it)
    launched = _without_launcher({**nowhere, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    run = subprocess.run([sys.executable, "-c", "import lightning_mpi; " + trainer], env=launched, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode != 0
    assert "cannot load MPI library" in run.stderr


def test_lightnings_leafspec_deprecation_is_filtered() -> None:
    from lightning.pytorch.utilities import _pytree

    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        _pytree._tree_flatten(1.0)
    with warnings.catch_warnings(record=True) as filtered:
        warnings.simplefilter("always")
        _lightning.ignore_foreign_warnings()
        _pytree._tree_flatten(1.0)
    assert not [w for w in filtered if "LeafSpec" in str(w.message)]
    # the filter is as narrow as the warning: category and module (a torch without the deprecation raises nothing)
    for w in plain:
        if "LeafSpec" in str(w.message):
            assert issubclass(w.category, FutureWarning)
            assert w.filename.endswith(os.path.join("utilities", "_pytree.py"))


def test_lightning_prints_through_its_own_loggers() -> None:
    """Every console handler a Lightning message can reach, propagating or not, is on a logger that
    lightning_mpi.console quiets ("Seed set to 0", "GPU available: ...")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lightning.fabric.utilities import seed

    listed = {logger.name for logger in _lightning.lightning_loggers()}
    for name in (seed.log.name, "lightning.pytorch.utilities.rank_zero"):
        logger: logging.Logger | None = logging.getLogger(name)
        reached = set()
        while logger is not None and logger is not logging.root:  # the root logger is the application's
            if any(type(h) is logging.StreamHandler for h in logger.handlers):
                reached.add(logger.name)
            logger = logger.parent if logger.propagate else None
        assert reached and reached <= listed, (name, reached)
    # the top-level package's own handler, reached once the subpackages propagate (a root handler at import)
    assert any(type(h) is logging.StreamHandler for h in logging.getLogger("lightning").handlers)
    assert "lightning" in listed
