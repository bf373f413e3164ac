"""Parameter averaging: local SGD and DiLoCo (``MPIStrategy(sync="average")``): the schedule of synchronisations;
what one does is its averager's (:mod:`lightning_mpi.policies.averagers`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_mpi.buffers import DEFAULT_BUCKET_MB, bucketize, validate_bucket_mb
from lightning_mpi.comm import Communicator
from lightning_mpi.policies.allreduce import GradientAllreduce
from lightning_mpi.policies.averagers import Averager, MeanAverage, ModelBuckets
from lightning_mpi.policies.base import SyncPolicy, broadcast_module, has_lazy_tensors
from lightning_mpi.policies.diloco import OuterStep
from lightning_mpi.signals import FlagChannel


class ParameterAveraging(SyncPolicy):
    """Local SGD: ranks train alone on their shards and average their models periodically.

    Every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs`` epochs (both ``None``: only once,
    at the end of fit: "train locally, then average"), all floating-point parameters and buffers are averaged
    in place. The first ``warmup_steps`` steps use gradient allreduce instead (post-local SGD).

    Optimizer state (momentum, Adam moments) is local by default: each rank keeps the statistics of its own
    gradients, which is what local SGD analyses assume and costs nothing. With ``average_optimizer_state=True``
    the floating-point optimizer state is averaged together with the parameters, so that after averaging every
    rank continues from identical optimizer state too (replicas then diverge only through their data).

    With ``outer_optimizer`` (a factory such as ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9,
    nesterov=True)``), averaging is DiLoCo's outer step (see :class:`~lightning_mpi.policies.diloco.OuterStep`): the
    ranks' changes since the last synchronisation are averaged and applied by that optimizer to the last
    synchronised parameters. Buffers are averaged as without it; the inner optimizer is the module's own.

    Validation, test and checkpoints always see the synchronised model: the model a synchronisation at that point
    would give (the average; with DiLoCo, the outer optimizer's step on the averaged changes). Between
    synchronisations the ranks' local models are kept: evaluation synchronises into the model temporarily and
    restores the local weights (and DiLoCo's outer state) afterwards; a checkpoint holds the synchronised model,
    plus every rank's local model and optimizer state (also when it is written during validation), so that a resumed
    fit continues exactly (with DiLoCo also the outer optimizer's state and the last synchronised parameters).
    Outside fit (``trainer.test(model, ckpt_path=...)``), every rank evaluates the averaged model of the checkpoint.

    Args:
        every_n_steps: average after every this many optimizer steps (counted after the warm-up); ``None``: not
            by steps.
        every_n_epochs: average at the start of every this many epochs; ``None``: not by epochs. With neither,
            the model is averaged once, at the end of fit.
        warmup_steps: the first steps use gradient allreduce (post-local SGD); ``0``: none.
        average_optimizer_state: also average the optimizer's floating-point state (momentum, Adam's moments) at
            each averaging; ``False``: each rank keeps its own.
        bucket_mb: capacity of a flat communication buffer in MiB (``None``: 25).
        outer_optimizer: DiLoCo: a factory of the outer optimizer over the parameters (for example
            ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)``; Hydra: ``_partial_: true``).
        pseudo_gradient_dtype: with ``outer_optimizer``: ``"bfloat16"`` or ``"float16"`` sends the changes in half
            precision (summed in float32); ``None``: in the parameters' dtype.
    """

    name = "average"
    averages_optimizer_state_in_checkpoints = True
    resumes_at_any_world_size = True

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        warmup_steps: int = 0,
        average_optimizer_state: bool = False,
        bucket_mb: float | None = None,
        outer_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
        pseudo_gradient_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        for label, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive integer or None, got {value!r}.")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}.")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.warmup_steps = warmup_steps
        self.average_optimizer_state = average_optimizer_state
        self.steps = 0
        self.averagings = 0
        self._in_sync = True
        self._bucket_mb = validate_bucket_mb(bucket_mb) or DEFAULT_BUCKET_MB
        self._gradients = GradientAllreduce(bucket_mb=bucket_mb, overlap=False)
        self._model: ModelBuckets | None = None
        self._broadcast_after_backward = False
        #: the local (not averaged) model while evaluation averages it temporarily
        self._local: list[Tensor] | None = None
        if outer_optimizer is None and pseudo_gradient_dtype is not None:
            raise ValueError("pseudo_gradient_dtype only applies with an outer_optimizer (DiLoCo).")
        self.averager: Averager = (
            MeanAverage() if outer_optimizer is None else OuterStep(outer_optimizer, pseudo_gradient_dtype)
        )
        #: the averager's state while evaluation previews a synchronisation
        self._averager_before: Any = None
        #: resumed at another world size: every rank starts from the checkpoint's synchronised model
        self._resynchronised = False

    @property
    def syncs_gradients(self) -> bool:  # type: ignore[override]
        return self.steps < self.warmup_steps

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        self._model = ModelBuckets(module, self._bucket_mb)
        continuing = fitting and resuming  # each rank continues from its own model, stored in the checkpoint
        if self.warmup_steps > 0:  # gradient buckets (and their per-parameter hooks) only serve the warm-up
            self._gradients.setup(comm, module, fitting, resuming)
        elif not continuing:
            broadcast_module(comm, module)
            self._broadcast_after_backward = has_lazy_tensors(module) and comm.size > 1
        if not continuing or self._resynchronised:
            self._in_sync = True
        self.averager.attach(module, restore=continuing)
        if self._resynchronised:
            self.averager.reset()  # every rank starts from the checkpoint's synchronised model
        self._resynchronised = False

    def continue_from_synchronised_model(self) -> None:
        self._resynchronised = True

    @property
    def loss_scale(self) -> float:
        return self._gradients.loss_scale if self.syncs_gradients else 1.0

    def before_training_step(self, module: Module, synchronised: bool, source: int = 0) -> None:
        if self.syncs_gradients:
            self._gradients.before_training_step(module, synchronised, source)

    def before_backward(self, module: Module, synchronised: bool) -> None:
        if self.syncs_gradients:
            self._gradients.before_backward(module, synchronised)

    def after_backward(self, module: Module, weight: float = 1.0) -> None:
        if self.syncs_gradients:
            self._gradients.after_backward(module, weight)
        elif self._broadcast_after_backward:  # lazy modules: replicas start from rank 0's materialised model
            self._broadcast_after_backward = False
            broadcast_module(self.comm, module)

    @property
    def flag_channel(self) -> FlagChannel | None:
        return self._gradients.flag_channel if self.syncs_gradients else None

    def after_optimizer_step(self, module: Module, optimizers: list[Optimizer]) -> None:
        self.steps += 1
        self._in_sync = self.steps <= self.warmup_steps and self._in_sync
        if self.steps == self.warmup_steps:
            self.averager.reset()  # the warm-up ends in sync
        if self.every_n_steps is not None and self.steps > self.warmup_steps and self.steps % self.every_n_steps == 0:
            self.average(optimizers)

    def on_train_epoch_start(self, module: Module, optimizers: list[Optimizer], epoch: int) -> None:
        if self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0:
            self.average(optimizers)

    def on_train_end(self, module: Module, optimizers: list[Optimizer]) -> None:
        if self._in_sync:  # the last step synchronised; buffers may have moved since (a forward without a step)
            self.averager.settle(self.comm, self._model_buckets())
            return
        self.average(optimizers)

    def average(self, optimizers: Sequence[Optimizer] = ()) -> None:
        """Synchronise the model (and, if chosen, average the optimizer state) over ranks, in place."""
        self.averager.synchronise(self.comm, self._model_buckets())
        if self.average_optimizer_state and self.comm.size > 1:
            _average_optimizer_state(self.comm, optimizers, self._bucket_mb)
        self.averagings += 1
        self._in_sync = True

    def _model_buckets(self) -> ModelBuckets:
        assert self._model is not None, "setup() first"
        return self._model

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        if self._in_sync or self.comm.size == 1 or self._local is not None:
            yield
            return
        model = self._model_buckets()
        self._local = model.values()
        self._averager_before = self.averager.snapshot()
        self.averager.synchronise(self.comm, model)
        try:
            yield
        finally:
            model.load(self._local)
            self._local = None
            self.averager.restore(self._averager_before)  # the synchronisation was a preview: training goes on
            self._averager_before = None

    def model_state_dict(self, module: Module) -> dict[str, Any]:
        if self._in_sync or self._local is not None:  # in sync, or already averaged for evaluation
            return module.state_dict()
        with self.evaluation(module):
            return {k: v.clone() for k, v in module.state_dict().items()}

    def rank_state_dict(self, module: Module) -> dict[str, Any]:
        if self._local is None:
            return module.state_dict()
        # Written during validation (ModelCheckpoint saves in on_validation_end): the model is averaged for now,
        # but this rank continues from its local weights.
        model = self._model_buckets()
        averaged = model.values()
        model.load(self._local)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        model.load(averaged)
        return state

    def restores_rank_states(self, fitting: bool) -> bool:
        return fitting  # outside fit, every rank evaluates the averaged model the checkpoint holds

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps, "averagings": self.averagings, "in_sync": self._in_sync}
        # during evaluation: the averager's state before the previewed synchronisation
        averager = self._averager_before if self._averager_before is not None else self.averager.state_dict()
        if averager is not None:
            state["outer"] = averager
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.averagings = int(state.get("averagings", 0))
        self._in_sync = bool(state.get("in_sync", False))
        if "outer" in state:
            self.averager.load_state_dict(state["outer"])


def _average_optimizer_state(comm: Communicator, optimizers: Sequence[Optimizer], bucket_mb: float) -> None:
    tensors = [
        value
        for opt in optimizers
        for state in opt.state.values()
        for value in state.values()
        if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0
    ]
    for bucket in bucketize(tensors, bucket_mb):
        comm.allreduce_(bucket.pack(), "mean")
        bucket.unpack()
