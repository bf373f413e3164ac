"""What MPIStrategy does around validation, test and predict, beside Lightning's loops."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import RunningStage

from lightning_mpi import _lightning
from lightning_mpi.comm import Communicator
from lightning_mpi.metrics import sync_metrics
from lightning_mpi.policies import SyncPolicy
from lightning_mpi.sampling import integer_evaluation_limit, shard_layout


class Evaluation:
    """One evaluation (a validation, test or predict loop) at a time: the policy's evaluation context, torchmetrics
    synchronised over the ranks, each rank's share of the samples, and predictions gathered where they were
    sharded (a loader left to the user already gives each rank its own, as under DDP)."""

    def __init__(self) -> None:
        self._context: ExitStack | None = None
        #: how each predict loader of the current predict was sharded (None: left to the user)
        self._prediction_layouts: list[str | None] = []

    def loader(self, policy: SyncPolicy, trainer: Trainer, dataloader: object) -> object:
        """What this rank evaluates: its share as the policy decides, where Lightning would have sharded."""
        processed = (
            policy.evaluation_loader(dataloader, integer_evaluation_limit(trainer))
            if _lightning.uses_distributed_sampler(trainer)
            else dataloader
        )
        if trainer.state.stage == RunningStage.PREDICTING:
            self._prediction_layouts.append(shard_layout(processed))
        return processed

    def enter(
        self, policy: SyncPolicy, module: LightningModule, comm: Communicator, is_distributed: Callable[[], bool]
    ) -> None:
        """At the start of a loop (every rank)."""
        sync_metrics(module, comm, is_distributed)
        self._context = ExitStack()
        self._context.enter_context(policy.evaluation(module))

    def exit(self) -> None:
        """At the end of a loop (every rank): the policy's context closes (e.g. averaging restores local weights)."""
        if self._context is not None:
            context, self._context = self._context, None
            context.close()

    def end_prediction(self, policy: SyncPolicy, trainer: Trainer, world_size: int) -> None:
        """After predict: every rank's predictions, in dataset order, where the loaders were sharded."""
        layouts, self._prediction_layouts = self._prediction_layouts, []
        if world_size > 1 and layouts and None not in layouts:
            predictions = _lightning.cached_predictions(trainer)
            policy.collect_predictions(predictions, interleaved="interleaved" in layouts)


def distributed_flag(strategy: object) -> Callable[[], bool]:
    """A picklable callable reading ``strategy.is_distributed`` when called."""
    return functools.partial(getattr, strategy, "is_distributed")
