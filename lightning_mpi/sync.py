"""How ranks are combined: one policy object per ``MPIStrategy(sync=...)``.

The strategy calls these hooks at fixed points of Lightning's loop; every hook that communicates is reached
by all ranks in the same order (the strategy makes sure of that), so no hook can deadlock on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_mpi import voting
from lightning_mpi.buffers import DEFAULT_BUCKET_MB, Bucket, bucketize
from lightning_mpi.comm import Communicator


def _floating_state(module: Module) -> list[Tensor]:
    """Parameters and floating-point buffers (BatchNorm running statistics), in a fixed order."""
    return list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]


def broadcast_module(comm: Communicator, module: Module, root: int = 0) -> None:
    """Make every rank's parameters and buffers equal to those of rank ``root``."""
    for bucket in bucketize(list(module.parameters()) + list(module.buffers())):
        comm.broadcast_(bucket.pack(), root)
        bucket.unpack()


class SyncPolicy:
    """Base policy: ranks train independently and nothing is communicated."""

    name = "none"
    #: evaluation and prediction see every sample on every rank (instead of a shard each)
    evaluates_all_samples = False
    #: gradients are averaged after backward (the strategy skips it on non-stepping micro-batches)
    syncs_gradients = False
    #: ranks may hold different models or optimizer state, so checkpoints keep every rank's own
    ranks_differ = True

    def __init__(self) -> None:
        self.comm: Communicator = Communicator()

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        self.comm = comm

    #: a stop request (SIGTERM) is agreed on every this many training batches: one tiny collective each time
    stop_check_every = 8

    @property
    def loss_scale(self) -> float:
        """Factor the strategy applies to the loss before a synchronised backward."""
        return 1.0

    def before_backward(self, module: Module) -> None:
        """Called before every backward while gradients are synchronised (also on non-stepping micro-batches)."""

    def after_backward(self, module: Module) -> None:
        """Called after every backward whose gradients feed an optimizer step."""

    def agree_on_stop(self, requested: bool, batch: int) -> bool:
        """Whether any rank asked to stop; the same answer on every rank. Called before training batch ``batch``
        (counted from 0 in this fit, identically on every rank)."""
        if self.comm.size == 1 or batch % self.stop_check_every:
            return False
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        return bool(self.comm.allreduce_(flag, "max").item())

    def after_optimizer_step(self, module: Module, optimizers: list[Optimizer]) -> None:
        """Called after the first optimizer of the module stepped."""

    def gradients_finite(self, module: Module) -> bool:
        """Whether every rank's gradients are finite; the same answer on every rank (collective)."""
        local = all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)
        flag = torch.tensor([0 if local else 1], dtype=torch.int32)
        return self.comm.allreduce_(flag, "max").item() == 0

    def on_train_epoch_start(self, module: Module, optimizers: list[Optimizer], epoch: int) -> None:
        """Called before the first batch of every training epoch."""

    def on_train_end(self, module: Module, optimizers: list[Optimizer]) -> None:
        """Called once at the end of fit, on every rank."""

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        """Context around validation, test and predict loops."""
        yield

    def model_state_dict(self, module: Module) -> dict[str, Any]:
        """The model state a checkpoint holds (collective: called on every rank)."""
        return module.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class GradientAllreduce(SyncPolicy):
    """Synchronous data parallelism: gradients are averaged over ranks after every backward that steps.

    Replicas start from rank 0's parameters and buffers and stay identical because every rank applies the same
    averaged gradient. Gradients travel in flat buckets of their own dtype (float64 stays float64).
    A parameter whose gradient is ``None`` on some ranks receives the mean with zeros from those ranks; one
    that has no gradient on any rank keeps ``grad=None``.

    Before backward, every parameter without a gradient gets its (zeroed) slice of the bucket as ``.grad``, so
    autograd accumulates straight into the bucket: no gradient is allocated, copied in or copied back. A hook
    notes which parameters really received a gradient, which keeps the ``None`` semantics above. The loss is
    scaled by ``1/N`` before backward (see :attr:`loss_scale`), so the allreduce is a plain sum; gradients
    therefore must come from a backward through the strategy (``training_step`` or ``manual_backward``), and
    on a non-stepping micro-batch of gradient accumulation they hold ``local gradient / N``.
    """

    name = "allreduce"
    syncs_gradients = True
    ranks_differ = False

    def __init__(self, bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
        super().__init__()
        self.bucket_mb = bucket_mb
        self._buckets: list[_GradientBucket] = []
        self._stop_requested = False
        self._stop_agreed = False
        self._hooks: list[Any] = []

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        broadcast_module(comm, module)
        self.build_buckets(module)

    def build_buckets(self, module: Module) -> None:
        trainable = [p for p in module.parameters() if p.requires_grad]
        # The tail of each bucket carries one flag per parameter (how many ranks produced a gradient), then one
        # stop flag: a SIGTERM agreement travels with the gradients instead of in a collective of its own.
        buckets = bucketize(trainable, self.bucket_mb, extra_per_tensor=1, extra_per_bucket=1)
        self._buckets = [_GradientBucket(b, self.comm) for b in buckets]
        for handle in self._hooks:
            handle.remove()
        self._hooks = [
            p.register_post_accumulate_grad_hook(_mark_received(gb.received, i))
            for gb in self._buckets
            for i, p in enumerate(gb.bucket.tensors)
        ]

    @property
    def loss_scale(self) -> float:
        # Backward of loss / N leaves gradient / N in the bucket, so a plain sum over ranks is already the mean:
        # no division pass over the gradients after the allreduce.
        return 1.0 / self.comm.size

    def before_backward(self, module: Module) -> None:
        if self.comm.size == 1:
            return
        with torch.no_grad():
            for bucket in (gb.bucket for gb in self._buckets):
                params = bucket.tensors
                missing = [i for i, p in enumerate(params) if p.grad is None]
                if len(missing) == len(params):
                    bucket.flat.zero_()
                else:
                    for i in missing:
                        bucket.views[i].zero_()
                for i in missing:
                    params[i].grad = bucket.views[i]

    def after_backward(self, module: Module) -> None:
        if self.comm.size == 1:
            return
        for gradient_bucket in self._buckets:
            self._allreduce_bucket(gradient_bucket)

    def agree_on_stop(self, requested: bool, batch: int) -> bool:
        # Answered from the last gradient allreduce, which carried every rank's request.
        self._stop_requested = requested
        agreed, self._stop_agreed = self._stop_agreed, False
        return agreed

    def gradients_finite(self, module: Module) -> bool:
        # After the allreduce every rank holds the same buckets: a local look is already a global answer.
        if self.comm.size == 1 or not self._buckets:
            return super().gradients_finite(module)
        return all(bool(torch.isfinite(gb.bucket.flat).all()) for gb in self._buckets)

    def _allreduce_bucket(self, gradient_bucket: _GradientBucket) -> None:
        bucket, received, tail = gradient_bucket.bucket, gradient_bucket.received, gradient_bucket.tail
        params = bucket.tensors
        grads = [p.grad for p in params]
        # The usual step: autograd accumulated every gradient into the bucket, so the flags are all ones.
        in_bucket = all(received) and all(g is v for g, v in zip(grads, bucket.views))
        flags = [1.0] * len(params) if in_bucket else self._gather_strays(bucket, grads, received)
        flags.append(1.0 if self._stop_requested else 0.0)
        if tail is not None:
            tail[:] = flags
        else:
            bucket.tail.copy_(torch.tensor(flags))
        gradient_bucket.reduce()  # a plain sum of gradients already divided by N: see loss_scale
        received[:] = [False] * len(received)
        *counts, stop = (tail if tail is not None else bucket.tail).tolist()  # sums of 0/1 flags over ranks
        self._stop_agreed = self._stop_agreed or stop > 0
        if in_bucket:
            return  # every count is at least our own 1: the averaged gradients already are the bucket's views
        for p, view, count in zip(params, bucket.views, counts):
            # The averaged gradient is handed out as a view of the bucket: no copy back.
            p.grad = view if count > 0 else None

    @staticmethod
    def _gather_strays(bucket: Bucket, grads: list[Tensor | None], received: list[bool]) -> list[float]:
        """Copy in gradients autograd did not accumulate into the bucket (``create_graph``, set by hand), zero
        the slices of parameters without a gradient, and return this rank's flags (1: has a gradient)."""
        with torch.no_grad():
            pairs = [(v, g) for v, g in zip(bucket.views, grads) if g is not None and g.data_ptr() != v.data_ptr()]
            if pairs:
                torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
            flags = [0.0 if g is None or not (got or g.data_ptr() != v.data_ptr()) else 1.0
                     for g, got, v in zip(grads, received, bucket.views)]
            for view, flag in zip(bucket.views, flags):
                if flag == 0.0:
                    view.zero_()
        return flags


class _GradientBucket:
    """A bucket of gradients and what its allreduce needs on every step."""

    def __init__(self, bucket: Bucket, comm: Communicator) -> None:
        self.bucket = bucket
        #: which parameters autograd accumulated a gradient into since the last allreduce (post-accumulate hooks)
        self.received = [False] * len(bucket.tensors)
        self.reduce = comm.prepared_allreduce(bucket.flat, "sum")
        # Flags are written through numpy where the tail is in host memory: ~1 µs instead of ~5 for torch.
        self.tail = bucket.tail.numpy() if bucket.tail.device.type == "cpu" else None


def _mark_received(received: list[bool], index: int) -> Callable[[Tensor], None]:
    def mark(_: Tensor) -> None:
        received[index] = True

    return mark


class ParameterAveraging(SyncPolicy):
    """Local SGD: ranks train alone on their shards and average their models periodically.

    Every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs`` epochs (both ``None``: only once,
    at the end of fit: "train locally, then average"), all floating-point parameters and buffers are averaged
    in place. The first ``warmup_steps`` steps use gradient allreduce instead (post-local SGD).

    Optimizer state (momentum, Adam moments) is local by default: each rank keeps the statistics of its own
    gradients, which is what local SGD analyses assume and costs nothing. With ``average_optimizer_state=True``
    the floating-point optimizer state is averaged together with the parameters, so that after averaging every
    rank continues from identical optimizer state too (replicas then diverge only through their data).

    Validation, test and checkpoints always see the averaged model. Between averaging points the ranks' local
    models are kept: evaluation averages into the model temporarily and restores the local weights afterwards,
    and a checkpoint stores the averaged weights.
    """

    name = "average"

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        warmup_steps: int = 0,
        average_optimizer_state: bool = False,
        bucket_mb: float = DEFAULT_BUCKET_MB,
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
        self._gradients = GradientAllreduce(bucket_mb)
        self._bucket_mb = bucket_mb
        self._buckets: list[Bucket] = []

    @property
    def syncs_gradients(self) -> bool:  # type: ignore[override]
        return self.steps < self.warmup_steps

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        if not resuming:  # a resumed rank continues from its own model, stored in the checkpoint
            broadcast_module(comm, module)
        self._gradients.comm = comm
        if self.warmup_steps > 0:  # gradient buckets (and their per-parameter hooks) only serve the warm-up
            self._gradients.build_buckets(module)
        self._buckets = bucketize(_floating_state(module), self._bucket_mb)
        self._in_sync = True

    @property
    def loss_scale(self) -> float:
        return self._gradients.loss_scale if self.steps < self.warmup_steps else 1.0

    def before_backward(self, module: Module) -> None:
        if self.steps < self.warmup_steps:
            self._gradients.before_backward(module)

    def after_backward(self, module: Module) -> None:
        if self.steps < self.warmup_steps:
            self._gradients.after_backward(module)

    def after_optimizer_step(self, module: Module, optimizers: list[Optimizer]) -> None:
        self.steps += 1
        self._in_sync = self.steps <= self.warmup_steps and self._in_sync
        if self.every_n_steps is not None and self.steps > self.warmup_steps and self.steps % self.every_n_steps == 0:
            self.average(optimizers)

    def on_train_epoch_start(self, module: Module, optimizers: list[Optimizer], epoch: int) -> None:
        if self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0:
            self.average(optimizers)

    def on_train_end(self, module: Module, optimizers: list[Optimizer]) -> None:
        self.average(optimizers)

    def average(self, optimizers: list[Optimizer] = ()) -> None:
        """Average the model (and, if chosen, optimizer state) over ranks, in place."""
        self._average_model()
        if self.average_optimizer_state and self.comm.size > 1:
            _average_optimizer_state(self.comm, optimizers, self._bucket_mb)
        self.averagings += 1
        self._in_sync = True

    def _average_model(self) -> None:
        if self.comm.size == 1:
            return
        for bucket in self._buckets:
            self.comm.allreduce_(bucket.pack(), "mean")
            bucket.unpack()

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        if self._in_sync or self.comm.size == 1:
            yield
            return
        local = [b.pack().clone() for b in self._buckets]
        self._average_model()
        try:
            yield
        finally:
            for bucket, saved in zip(self._buckets, local):
                bucket.flat.copy_(saved)
                bucket.unpack()

    def model_state_dict(self, module: Module) -> dict[str, Any]:
        if self._in_sync:
            return module.state_dict()
        with self.evaluation(module):
            return {k: v.clone() for k, v in module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "averagings": self.averagings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.averagings = int(state.get("averagings", 0))


def _average_optimizer_state(comm: Communicator, optimizers: list[Optimizer], bucket_mb: float) -> None:
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


class Ensemble(SyncPolicy):
    """Every rank trains its own member on its own shard; evaluation combines the members.

    Members start from different weights (re-initialised with a rank-dependent seed unless resuming) and see
    different random streams. Validation, test and predict give every rank all samples in the same order; the
    module's ``forward`` then returns the combined output of all members (see :mod:`lightning_mpi.voting`), so
    metrics and predictions see the ensemble. ``member_outputs`` holds the last gathered per-member outputs
    (``[members, batch, ...]``) for per-member metrics.
    """

    name = "ensemble"
    evaluates_all_samples = True

    def __init__(self, voting: str = "hard", seed: int | None = None) -> None:
        super().__init__()
        self.combine = combiner(voting)
        self.voting = voting
        self.seed = seed
        self.member_outputs: Tensor | None = None

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        if fitting and not resuming:
            base = self.seed if self.seed is not None else torch.initial_seed()
            torch.manual_seed((base + 7919 * comm.rank) % 2**63)
            for sub in module.modules():
                if sub is not module and callable(getattr(sub, "reset_parameters", None)):
                    sub.reset_parameters()

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        original = module.forward

        def ensemble_forward(*args: Any, **kwargs: Any) -> Tensor:
            out = original(*args, **kwargs)
            members = torch.stack(self.comm.allgather(out.detach()))
            self.member_outputs = members
            return self.combine(members)

        module.forward = ensemble_forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            del module.forward

    def model_state_dict(self, module: Module) -> dict[str, Any]:
        return module.state_dict()


def combiner(name: str) -> Callable[[Tensor], Tensor]:
    """The function that turns stacked member outputs ``[members, batch, ...]`` into the ensemble's output."""
    table = {
        "hard": voting.hard_vote_scores,
        "soft": voting.soft_vote_log_probs,
        "mean": voting.mean_vote,
        "median": voting.median_vote,
    }
    if name not in table:
        raise ValueError(f"voting={name!r} is not known: choose one of {sorted(table)}.")
    return table[name]
