"""Parameter averaging: local SGD and DiLoCo (``MPIStrategy(sync="average")``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_mpi.buffers import DEFAULT_BUCKET_MB, Bucket, bucketize, validate_bucket_mb
from lightning_mpi.comm import Communicator
from lightning_mpi.policies.allreduce import GradientAllreduce
from lightning_mpi.policies.base import (
    SyncPolicy,
    broadcast_module,
    floating_state,
    has_lazy_tensors,
    same_tensors,
    trainable,
)
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
        self._module: Module | None = None
        self._model_buckets: list[Bucket] | None = None
        self._broadcast_after_backward = False
        #: the local (not averaged) model while evaluation averages it temporarily
        self._local: list[Tensor] | None = None
        self._outer = OuterStep(outer_optimizer, pseudo_gradient_dtype) if outer_optimizer is not None else None
        if self._outer is None and pseudo_gradient_dtype is not None:
            raise ValueError("pseudo_gradient_dtype only applies with an outer_optimizer (DiLoCo).")
        self._rest_buckets: list[Bucket] | None = None
        #: DiLoCo's outer state while evaluation previews a synchronisation
        self._outer_before: dict[str, Any] | None = None
        #: resumed at another world size: every rank starts from the checkpoint's synchronised model
        self._resynchronised = False

    @property
    def syncs_gradients(self) -> bool:  # type: ignore[override]
        return self.steps < self.warmup_steps

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        self._module = module
        self._model_buckets = None
        continuing = fitting and resuming  # each rank continues from its own model, stored in the checkpoint
        if self.warmup_steps > 0:  # gradient buckets (and their per-parameter hooks) only serve the warm-up
            self._gradients.setup(comm, module, fitting, resuming)
        elif not continuing:
            broadcast_module(comm, module)
            self._broadcast_after_backward = has_lazy_tensors(module) and comm.size > 1
        if not continuing or self._resynchronised:
            self._in_sync = True
        self._rest_buckets = None
        if self._outer is not None:
            self._outer.attach(trainable(module), restore=continuing)
            if self._resynchronised:
                self._outer.reset()  # changes count from the model every rank starts from
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
        if self._outer is not None and self.steps == self.warmup_steps:
            self._outer.reset()  # the warm-up ends in sync: local changes count from here
        if self.every_n_steps is not None and self.steps > self.warmup_steps and self.steps % self.every_n_steps == 0:
            self.average(optimizers)

    def on_train_epoch_start(self, module: Module, optimizers: list[Optimizer], epoch: int) -> None:
        if self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0:
            self.average(optimizers)

    def on_train_end(self, module: Module, optimizers: list[Optimizer]) -> None:
        if self._outer is not None and self._in_sync:
            # Already the last outer step's parameters: another step on zero changes would still move them
            # (momentum). Buffers may have changed since (a forward without a step), and averaging them is idempotent.
            self._average_rest()
            return
        self.average(optimizers)

    def average(self, optimizers: Sequence[Optimizer] = ()) -> None:
        """Average the model (and, if chosen, optimizer state) over ranks, in place; with an outer optimizer, its
        step on the averaged changes sets the parameters."""
        self._synchronise_model()
        if self.average_optimizer_state and self.comm.size > 1:
            _average_optimizer_state(self.comm, optimizers, self._bucket_mb)
        self.averagings += 1
        self._in_sync = True

    def _synchronise_model(self) -> None:
        """The model a synchronisation gives: the average, or with DiLoCo the outer step on the averaged changes."""
        if self._outer is None:
            self._average_model()
        else:
            self._outer.step(self.comm, self._bucket_mb)
            self._average_rest()

    def _buckets(self) -> list[Bucket]:
        assert self._module is not None
        state = floating_state(self._module)
        built = [t for bucket in self._model_buckets or [] for t in bucket.tensors]
        # Built on first use (lazy modules are materialised by then), and again when a callback or the module
        # replaced tensors (SWA's BatchNorm reset, register_buffer again): averaging must reach the module's own.
        if self._model_buckets is None or not same_tensors(built, state):
            self._model_buckets = bucketize(state, self._bucket_mb)
            self._rest_buckets = None
        return self._model_buckets

    def _average_model(self) -> None:
        _average(self.comm, self._buckets())

    def _average_rest(self) -> None:
        """Buffers and frozen parameters: what the outer optimizer does not step."""
        self._buckets()  # rebuilt (with the rest) if the module's tensors were replaced
        if self._rest_buckets is None:
            assert self._module is not None
            outer = {id(p) for p in trainable(self._module)}
            rest = [t for t in floating_state(self._module) if id(t) not in outer]
            self._rest_buckets = bucketize(rest, self._bucket_mb)
        _average(self.comm, self._rest_buckets)

    def _load(self, values: list[Tensor]) -> None:
        for bucket, saved in zip(self._buckets(), values):
            bucket.flat.copy_(saved)
            bucket.unpack()

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        if self._in_sync or self.comm.size == 1 or self._local is not None:
            yield
            return
        self._local = [b.pack().clone() for b in self._buckets()]
        self._outer_before = self._outer.snapshot() if self._outer is not None else None
        self._synchronise_model()
        try:
            yield
        finally:
            self._load(self._local)
            self._local = None
            if self._outer is not None and self._outer_before is not None:
                self._outer.restore(self._outer_before)  # the step was a preview: training continues as before
            self._outer_before = None

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
        averaged = [b.pack().clone() for b in self._buckets()]
        self._load(self._local)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        self._load(averaged)
        return state

    def restores_rank_states(self, fitting: bool) -> bool:
        return fitting  # outside fit, every rank evaluates the averaged model the checkpoint holds

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps, "averagings": self.averagings, "in_sync": self._in_sync}
        if self._outer is not None:  # during evaluation: the state before the previewed step
            state["outer"] = self._outer_before if self._outer_before is not None else self._outer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.averagings = int(state.get("averagings", 0))
        self._in_sync = bool(state.get("in_sync", False))
        if self._outer is not None and "outer" in state:
            self._outer.load_state_dict(state["outer"])


def _average(comm: Communicator, buckets: list[Bucket]) -> None:
    if comm.size == 1:
        return
    for bucket in buckets:
        comm.allreduce_(bucket.pack(), "mean")
        bucket.unpack()


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
