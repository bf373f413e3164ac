"""The Lightning internals of lightning_mpi/_lightning.py still exist and mean what we use them for.

A Lightning release that renames or reshapes one of them fails here, not silently in a multi-rank run.
"""

from __future__ import annotations

from functools import partial
from unittest.mock import Mock

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper, _IndexBatchSamplerWrapper
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from lightning_mpi import _lightning
from tests.scenarios.common import BATCH, Regressor, quiet_trainer, regression_data


def test_request_stop_is_what_lightning_reads_as_a_received_sigterm():
    trainer = Trainer(accelerator="cpu", logger=False)
    assert not trainer.received_sigterm
    _lightning.request_stop(trainer)
    assert trainer.received_sigterm


def test_trainer_flags_read_from_the_accelerator_connector():
    assert _lightning.uses_distributed_sampler(Trainer(accelerator="cpu", logger=False))
    assert not _lightning.uses_distributed_sampler(Trainer(accelerator="cpu", logger=False, use_distributed_sampler=False))
    assert not _lightning.trainer_builds_distributed(Trainer(accelerator="cpu", logger=False))


def test_cached_predictions_are_the_predict_loops_per_dataloader_lists():
    trainer = quiet_trainer(strategy=SingleDeviceStrategy("cpu"))
    module = Regressor()
    module.predict_step = lambda batch, batch_idx: module(batch[0])
    returned = trainer.predict(module, DataLoader(regression_data(3 * BATCH), batch_size=BATCH))
    cached = _lightning.cached_predictions(trainer)
    assert len(cached) == 1 and len(cached[0]) == 3
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
    assert list(wrapper) == [[4], [3]] and len(wrapper) == 2


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


def test_after_every_trainer_init_runs_once_per_trainer():
    seen: list[Trainer] = []
    original = Trainer.__init__
    try:
        _lightning.after_every_trainer_init(seen.append)
        _lightning.after_every_trainer_init(seen.append)  # idempotent: installed once
        trainer = Trainer(accelerator="cpu", logger=False)
        assert seen == [trainer]
    finally:
        Trainer.__init__ = original
