"""How ranks are combined: one policy object per ``MPIStrategy(sync=...)``.

The strategy calls these hooks at fixed points of Lightning's loop; every hook that communicates is reached
by all ranks in the same order (the strategy makes sure of that), so no hook can deadlock on its own.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn import Module
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from lightning_mpi import voting
from lightning_mpi.buffers import DEFAULT_BUCKET_MB, OVERLAP_BUCKET_MB, Bucket, ByteBucket, bucketize
from lightning_mpi.comm import Communicator
from lightning_mpi.diloco import OuterStep
from lightning_mpi.sampling import gather_shards, shard_evaluation_dataloader
from lightning_mpi.signals import FlagChannel


def _floating_state(module: Module) -> list[Tensor]:
    """Parameters and floating-point buffers (BatchNorm running statistics), in a fixed order."""
    return list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]


def has_lazy_tensors(module: Module) -> bool:
    """Whether ``module`` holds parameters or buffers of lazy modules that no forward has materialised yet."""
    return any(is_lazy(t) for t in (*module.parameters(), *module.buffers()))


def broadcast_module(comm: Communicator, module: Module, root: int = 0) -> None:
    """Make every rank's (materialised) parameters and buffers equal to those of rank ``root``."""
    if comm.size == 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if not is_lazy(t)]
    for bucket in bucketize(tensors):
        comm.broadcast_(bucket.pack(), root)
        bucket.unpack()


class SyncPolicy:
    """How ranks are combined: the hooks MPIStrategy calls at fixed points of Lightning's loop.

    This base class trains every rank alone (nothing is communicated during training); evaluation takes a shard
    per rank. Hooks that communicate say so: every rank reaches them in the same order.
    """

    name = "none"
    #: evaluation and prediction see every sample on every rank (instead of a shard each)
    evaluates_all_samples = False
    #: gradients are averaged after backward (the strategy skips it on non-stepping micro-batches)
    syncs_gradients = False
    #: ranks may hold different models or optimizer state, so checkpoints keep every rank's own
    ranks_differ = True
    #: every rank must build the same model and optimizers (checked at the start of fit)
    identical_replicas = True

    def __init__(self) -> None:
        self.comm: Communicator = Communicator()

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        self.comm = comm

    @property
    def flag_channel(self) -> FlagChannel | None:
        """A channel on which small agreements (a SIGTERM stop) ride with a collective this policy makes before
        every training batch anyway; ``None`` if it makes none."""
        return None

    @property
    def loss_scale(self) -> float:
        """Factor the strategy applies to the loss before a synchronised backward."""
        return 1.0

    def before_training_step(self, module: Module, synchronised: bool, source: int = 0) -> None:
        """Called before every ``training_step``; ``synchronised``: its backward will be synchronised; ``source``:
        the lowest rank with a batch of its own in this step (see :mod:`lightning_mpi.join`)."""

    def before_backward(self, module: Module, synchronised: bool) -> None:
        """Called before every backward through the strategy (also on non-stepping micro-batches, where
        ``synchronised`` is false)."""

    def after_backward(self, module: Module, weight: float = 1.0) -> None:
        """Called after every backward whose gradients feed an optimizer step (collective where it communicates).
        Averaged gradients are multiplied by ``weight`` (more than 1 when some ranks had no batch to contribute)."""

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

    def before_evaluation_step(self, module: Module) -> None:
        """Called before every validation, test and predict step."""

    def evaluation_loader(self, dataloader: object, limit: int | None = None) -> object:
        """What a rank evaluates and predicts on: its share of the samples (see :mod:`lightning_mpi.sampling`);
        ``limit``: the batches per rank an integer ``limit_val_batches``/``limit_test_batches`` allows."""
        return shard_evaluation_dataloader(dataloader, self.comm.size, self.comm.rank, limit)

    def collect_predictions(self, predictions: list[list[Any]], interleaved: bool = False) -> None:
        """Turn each rank's predictions (one list of batch outputs per dataloader) into everyone's, in place, in
        dataset order (``interleaved``: the shards of a limited prediction)."""
        gather_shards(predictions, self.comm, interleaved)

    def model_state_dict(self, module: Module) -> dict[str, Any]:
        """The model state a checkpoint holds (collective: called on every rank)."""
        return module.state_dict()

    def rank_state_dict(self, module: Module) -> dict[str, Any]:
        """This rank's own model state, from which it continues training (stored per rank if ``ranks_differ``)."""
        return module.state_dict()

    def restores_rank_states(self, fitting: bool) -> bool:
        """Whether a rank loads its own stored state (rather than the checkpoint's model) in this run."""
        return self.ranks_differ

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class GradientAllreduce(SyncPolicy):
    """Synchronous data parallelism: gradients are averaged over ranks after every backward that steps.

    Replicas start from rank 0's parameters and buffers and stay identical because every rank applies the same
    averaged gradient. Gradients travel in flat buckets of their own dtype (float64 stays float64).
    A parameter whose gradient is ``None`` on some ranks receives the mean with zeros from those ranks; one
    that has no gradient on any rank keeps ``grad=None``. Sparse gradients (``nn.Embedding(sparse=True)``) stay
    sparse: their indices and values are gathered from every rank and summed.

    Buffers (BatchNorm running statistics) follow rank 0, as under DDP with ``broadcast_buffers=True``: they
    are broadcast from rank 0 before the first forward that follows a synchronised training step (the next
    training step, or evaluation), and at the end of fit.

    Before backward, every parameter without a gradient gets its (zeroed) slice of the bucket as ``.grad``, so
    autograd accumulates straight into the bucket: no gradient is allocated, copied in or copied back. A hook
    notes which parameters really received a gradient, which keeps the ``None`` semantics above. The loss is
    scaled by ``1/N`` before backward (see :attr:`loss_scale`), so the allreduce is a plain sum; gradients
    therefore must come from a backward through the strategy (``training_step`` or ``manual_backward``), and
    on a non-stepping micro-batch of gradient accumulation they hold ``local gradient / N``. Several
    synchronised backward calls before one optimizer step (manual optimization) accumulate the averages, as
    under DDP: gradients already averaged are scaled back to a ``1/N`` share before the next backward, so that
    the next sum counts them once.

    Lazy modules (``nn.LazyLinear``) are materialised by the first forward: buckets are built at the first
    backward, and parameters and buffers are broadcast from rank 0 once that backward's gradients are averaged.

    With ``overlap``, communication runs while backward goes on, as under DDP and Horovod: buckets hold the
    parameters in reverse order (backward produces the last layers' gradients first), and each bucket is reduced
    on a background thread as soon as every gradient in it has arrived, in bucket order on every rank; the end
    of backward waits for them (buckets with a parameter that got no gradient are reduced then). ``None``: off.
    Measured between 2 emulated nodes of one core each (README, "Gradients at network speed"), overlap did not
    pay: MPI's progress engine polls the core that backward needs, and smaller buckets cost more calls; it may pay
    where every rank has a core to spare. ``bucket_mb`` ``None``: one bucket of up to 25 MiB without overlap
    (fewest calls), buckets of 16 MiB with it (the first one starts during backward).
    """

    name = "allreduce"
    syncs_gradients = True
    ranks_differ = False

    def __init__(self, bucket_mb: float | None = None, overlap: bool | None = None) -> None:
        super().__init__()
        self.bucket_mb = bucket_mb
        self.overlap = overlap
        self._overlapping = False
        self._launching = False
        self._next_launch = 0
        #: buckets whose reduction started while backward was still running (overlap), since setup
        self.overlapped_buckets = 0
        self._buckets: list[_GradientBucket] | None = None
        self._sparse: list[Tensor] = []
        self._buffers: ByteBucket | None = None
        self._buffers_stale = False
        self._buffer_source = 0
        self._broadcast_after_backward = False
        self._sparse_reduced: set[int] = set()
        self._flags = FlagChannel()
        self._hooks: list[Any] = []
        self._trainable: list[Tensor] = []

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        if not (fitting and resuming):  # a resumed fit loads one checkpoint on every rank: replicas already agree
            broadcast_module(comm, module)
        self._overlapping = bool(self.overlap) and comm.enable_background()
        self._buckets = None
        self._buffers = None
        self._buffers_stale = False
        if not has_lazy_tensors(module):
            self.build_buckets(module)
        else:
            self._broadcast_after_backward = comm.size > 1

    def build_buckets(self, module: Module) -> None:
        sparse = {id(m.weight) for m in module.modules() if isinstance(m, _SPARSE_MODULES) and m.sparse}
        trainable = [p for p in module.parameters() if p.requires_grad and not is_lazy(p)]
        self._sparse = [p for p in trainable if id(p) in sparse]
        dense = [p for p in trainable if id(p) not in sparse]
        if self._overlapping:
            dense.reverse()  # the order in which backward produces the gradients, roughly
        default_mb = OVERLAP_BUCKET_MB if self._overlapping else DEFAULT_BUCKET_MB
        # The tail of each bucket carries one flag per parameter (how many ranks produced a gradient), then the
        # flag of the policy's FlagChannel: a SIGTERM agreement travels with the gradients, no collective of its own.
        buckets = bucketize(dense, self.bucket_mb or default_mb, extra_per_tensor=1, extra_per_bucket=1)
        self._buckets = [_GradientBucket(b, self.comm) for b in buckets]
        for handle in self._hooks:
            handle.remove()
        self._hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(self._gradient_arrived, k, i))
            for k, gb in enumerate(self._buckets)
            for i, p in enumerate(gb.bucket.tensors)
        ]
        buffers = [b for b in module.buffers() if not is_lazy(b)]
        self._buffers = ByteBucket(buffers) if buffers and self.comm.size > 1 else None
        self._trainable = trainable

    def _trainable_changed(self, module: Module) -> bool:
        current = [p for p in module.parameters() if p.requires_grad]
        return not _same_tensors(self._trainable, current)

    @property
    def loss_scale(self) -> float:
        # Backward of loss / N leaves gradient / N in the bucket, so a plain sum over ranks is already the mean:
        # no division pass over the gradients after the allreduce.
        return 1.0 / self.comm.size

    def before_training_step(self, module: Module, synchronised: bool, source: int = 0) -> None:
        self._follow_rank_zero_buffers(module)
        # DDP's rule: a forward whose backward is synchronised makes the buffers stale for the next forward.
        self._buffers_stale = synchronised and self.comm.size > 1
        self._buffer_source = source

    def _follow_rank_zero_buffers(self, module: Module, always: bool = False) -> None:
        if (self._buffers_stale or always) and self.comm.size > 1:
            buffers = [b for b in module.buffers() if not is_lazy(b)]
            if self._buffers is None or not _same_tensors(self._buffers.tensors, buffers):
                # A callback or the module put new tensors in (SWA's BatchNorm reset, register_buffer again):
                # follow them, not the old ones.
                self._buffers = ByteBucket(buffers) if buffers else None
            if self._buffers is not None:
                self.comm.broadcast_(self._buffers.pack(), self._buffer_source)
                self._buffers.unpack()
        self._buffers_stale = False

    def before_backward(self, module: Module, synchronised: bool) -> None:
        if self.comm.size == 1:
            return
        if self._buckets is None or self._trainable_changed(module):
            # Lazy modules are materialised by now (the forward ran); or a callback froze or unfroze parameters, or
            # the module gained some (BackboneFinetuning, configure_model): every rank sees the change at the same
            # step, so every rank rebuilds its buckets here alike (DDP's reducer keeps its first set).
            self.build_buckets(module)
        assert self._buckets is not None
        for gradient_bucket in self._buckets:
            gradient_bucket.prepare()
        for p in self._sparse:
            if p.grad is not None and id(p) in self._sparse_reduced:
                p.grad = p.grad * (1.0 / self.comm.size)
        self._sparse_reduced.clear()
        # Ranks checked call by call (uneven inputs) reduce at the end of backward, on the main communicator.
        self._launching = synchronised and self._overlapping and not self.comm.checks_calls
        self._next_launch = 0

    def _gradient_arrived(self, bucket_index: int, index: int, _: Tensor) -> None:
        """A post-accumulate-grad hook: parameter ``index`` of bucket ``bucket_index`` has its gradient."""
        assert self._buckets is not None
        if self._buckets[bucket_index].arrived(index) and self._launching:
            self._launch_complete_buckets()

    def _launch_complete_buckets(self) -> None:
        buckets = self._buckets
        assert buckets is not None
        while self._next_launch < len(buckets) and buckets[self._next_launch].complete:
            buckets[self._next_launch].start(self._flags, background=True)
            self._next_launch += 1
            self.overlapped_buckets += 1

    def after_backward(self, module: Module, weight: float = 1.0) -> None:
        if self.comm.size == 1:
            return
        assert self._buckets is not None
        for gradient_bucket in self._buckets[self._next_launch :]:  # in bucket order, as every rank
            gradient_bucket.start(self._flags, background=self._launching)
        self._launching, self._next_launch = False, 0
        for gradient_bucket in self._buckets:
            gradient_bucket.finish(self._flags)
            if weight != 1.0:
                gradient_bucket.bucket.flat.mul_(weight)
        if self._sparse:
            self._allreduce_sparse(weight)
        if self._broadcast_after_backward:
            # Lazy parameters were initialised by each rank's first forward: make the replicas identical now that
            # the graph is gone (before the first optimizer step).
            self._broadcast_after_backward = False
            broadcast_module(self.comm, module)

    def _allreduce_sparse(self, weight: float) -> None:
        has = torch.tensor([p.grad is not None for p in self._sparse], dtype=torch.int32)
        counts = self.comm.allreduce_(has, "sum").tolist()
        for p, count in zip(self._sparse, counts):
            if count == 0:
                continue
            grad = p.grad.coalesce() if p.grad is not None else torch.sparse_coo_tensor(
                torch.zeros((1, 0), dtype=torch.int64), torch.zeros((0, *p.shape[1:]), dtype=p.dtype), p.shape
            )
            if not grad.is_sparse:
                raise RuntimeError(
                    f"A parameter of a sparse embedding got a dense gradient ({tuple(p.shape)}): mixing sparse and "
                    "dense gradients for one parameter is not supported."
                )
            indices = torch.cat(self.comm.allgather(grad.indices().t().contiguous())).t()
            values = torch.cat(self.comm.allgather(grad.values().contiguous()))
            p.grad = torch.sparse_coo_tensor(indices, values * weight, p.shape).coalesce()  # N shares of 1/N
            self._sparse_reduced.add(id(p))

    @property
    def flag_channel(self) -> FlagChannel | None:
        # Flags ride in the tail of the gradient buckets; without a dense bucket (lazy modules before the first
        # backward, only sparse gradients) there is nothing to ride on.
        return self._flags if self._buckets else None

    def gradients_finite(self, module: Module) -> bool:
        # After the allreduce every rank holds the same buckets: a local look is already a global answer.
        if self.comm.size == 1 or not self._buckets:
            return super().gradients_finite(module)
        dense = all(bool(torch.isfinite(gb.bucket.flat).all()) for gb in self._buckets)
        return dense and all(bool(torch.isfinite(p.grad.values()).all()) for p in self._sparse if p.grad is not None)

    def before_evaluation_step(self, module: Module) -> None:
        # At the first evaluation forward, as DDP: callbacks that swap weights in at the start of evaluation (EMA)
        # have done so by then, and every rank evaluates rank 0's buffers.
        self._follow_rank_zero_buffers(module)

    def on_train_end(self, module: Module, optimizers: list[Optimizer]) -> None:
        # Always: callbacks' on_train_end ran just before (EMA copies its averaged buffers in there).
        self._follow_rank_zero_buffers(module, always=True)


_SPARSE_MODULES = (torch.nn.Embedding, torch.nn.EmbeddingBag)
# bfloat16 has no numpy dtype: its buckets' tails are written through torch (and reduced in float32 by the comm).
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


class _GradientBucket:
    """A bucket of gradients and what its allreduce needs on every step."""

    def __init__(self, bucket: Bucket, comm: Communicator) -> None:
        self.bucket = bucket
        self.size = comm.size
        #: which parameters autograd accumulated a gradient into since the last allreduce (post-accumulate hooks)
        self.received = [False] * len(bucket.tensors)
        #: which parameters still hold the gradient the last allreduce gave them (not set to ``None`` since)
        self.carried = [False] * len(bucket.tensors)
        #: the views hold gradients averaged by the last allreduce (not yet zeroed or scaled back)
        self.reduced = False
        #: which parameters received their gradient in the current backward, and how many have not yet
        self._arrived = [False] * len(bucket.tensors)
        self._waiting = len(bucket.tensors)
        self._in_bucket = False
        self._reduce = comm.prepared_allreduce(bucket.flat, "sum")
        # Flags are written through numpy where the tail is in host memory: ~1 µs instead of ~5 for torch.
        self._tail = bucket.tail.numpy() if bucket.tail.device.type == "cpu" and bucket.tail.dtype in _NUMPY_DTYPES else None

    def prepare(self) -> None:
        """Before a backward: hand the bucket's views to autograd as gradients where there are none."""
        params, views = self.bucket.tensors, self.bucket.views
        missing = [i for i, p in enumerate(params) if p.grad is None]
        with torch.no_grad():
            if len(missing) == len(params):
                self.bucket.flat.zero_()
            else:
                if self.reduced:  # a second synchronised backward before the step: count the average once
                    self.bucket.flat.mul_(1.0 / self.size)
                for i in missing:
                    views[i].zero_()
            for i in missing:
                params[i].grad = views[i]
                self.carried[i] = False
        self.reduced = False
        self._arrived = [False] * len(params)
        self._waiting = len(params)

    def arrived(self, index: int) -> bool:
        """Note that parameter ``index`` received a gradient; whether that made the bucket complete."""
        self.received[index] = True
        if self._arrived[index]:
            return False
        self._arrived[index] = True
        self._waiting -= 1
        return self._waiting == 0

    @property
    def complete(self) -> bool:
        """Every parameter of the bucket received its gradient in this backward."""
        return self._waiting == 0

    def start(self, flags: FlagChannel, background: bool) -> None:
        """Start summing the bucket over ranks (on the background thread, or now), with this rank's gradient flags
        and ``flags``' outgoing value in its tail."""
        bucket = self.bucket
        params = bucket.tensors
        grads = [p.grad for p in params]
        # The usual step: autograd accumulated every gradient into the bucket, so the flags are all ones.
        self._in_bucket = all(self.received) and all(g is v for g, v in zip(grads, bucket.views))
        tail = [1.0] * len(params) if self._in_bucket else self._gather_strays(grads)
        tail.append(1.0 if flags.outgoing else 0.0)
        if self._tail is not None:
            self._tail[:] = tail
        else:
            bucket.tail.copy_(torch.tensor(tail))
        # a plain sum of gradients already divided by N: see GradientAllreduce.loss_scale
        (self._reduce.start if background else self._reduce.run)()

    def finish(self, flags: FlagChannel) -> None:
        """Wait for the started sum and hand out the averaged gradients."""
        bucket, received = self.bucket, self.received
        params = bucket.tensors
        self._reduce.wait()
        self.reduced = True
        received[:] = [False] * len(received)
        *counts, flagged = (self._tail if self._tail is not None else bucket.tail).tolist()  # sums of 0/1 flags
        flags.deliver(flagged)
        if self._in_bucket:  # every count is at least our own 1: the averaged gradients already are the views
            self.carried[:] = [True] * len(self.carried)
            return
        for i, (p, view, count) in enumerate(zip(params, bucket.views, counts)):
            # The averaged gradient is handed out as a view of the bucket: no copy back.
            p.grad = view if count > 0 else None
            self.carried[i] = count > 0

    def _gather_strays(self, grads: list[Tensor | None]) -> list[float]:
        """Copy in gradients autograd did not accumulate into the bucket (``create_graph``, set by hand), zero
        the slices of parameters without a gradient, and return this rank's flags (1: has a gradient)."""
        views = self.bucket.views
        with torch.no_grad():
            pairs = [(v, g) for v, g in zip(views, grads) if g is not None and g.data_ptr() != v.data_ptr()]
            if pairs:
                torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
            flags = [
                0.0 if g is None or not (got or carried or g.data_ptr() != v.data_ptr()) else 1.0
                for g, got, carried, v in zip(grads, self.received, self.carried, views)
            ]
            for view, flag in zip(views, flags):
                if flag == 0.0:
                    view.zero_()
        return flags


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
    nesterov=True)``), averaging is DiLoCo's outer step (see :class:`~lightning_mpi.diloco.OuterStep`): the ranks' changes since the last
    synchronisation are averaged and applied by that optimizer to the last synchronised parameters. Buffers are
    averaged as without it; the inner optimizer is the module's own.

    Validation, test and checkpoints always see the synchronised model: the model a synchronisation at that point
    would give (the average; with DiLoCo, the outer optimizer's step on the averaged changes). Between
    synchronisations the ranks' local models are kept: evaluation synchronises into the model temporarily and
    restores the local weights (and DiLoCo's outer state) afterwards; a checkpoint holds the synchronised model, plus every rank's local model and optimizer state (also when it is
    written during validation), so that a resumed fit continues exactly (with DiLoCo also the outer optimizer's
    state and the last synchronised parameters). Outside fit (``trainer.test(model, ckpt_path=...)``), every rank
    evaluates the averaged model of the checkpoint.
    """

    name = "average"

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        warmup_steps: int = 0,
        average_optimizer_state: bool = False,
        bucket_mb: float = DEFAULT_BUCKET_MB,
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
        self._gradients = GradientAllreduce(bucket_mb, overlap=False)
        self._bucket_mb = bucket_mb
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
        if not continuing:
            self._in_sync = True
        self._rest_buckets = None
        if self._outer is not None:
            self._outer.attach(_trainable(module), restore=continuing)

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

    def average(self, optimizers: list[Optimizer] = ()) -> None:
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
        state = _floating_state(self._module)
        built = [t for bucket in self._model_buckets or [] for t in bucket.tensors]
        # Built on first use (lazy modules are materialised by then), and again when a callback or the module
        # replaced tensors (SWA's BatchNorm reset, register_buffer again): averaging must reach the module's own.
        if self._model_buckets is None or not _same_tensors(built, state):
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
            trainable = {id(p) for p in _trainable(self._module)}
            rest = [t for t in _floating_state(self._module) if id(t) not in trainable]
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
        state = {"steps": self.steps, "averagings": self.averagings, "in_sync": self._in_sync}
        if self._outer is not None:  # during evaluation: the state before the previewed step
            state["outer"] = self._outer_before if self._outer_before is not None else self._outer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.averagings = int(state.get("averagings", 0))
        self._in_sync = bool(state.get("in_sync", False))
        if self._outer is not None and "outer" in state:
            self._outer.load_state_dict(state["outer"])


def _same_tensors(held: list[Tensor], current: list[Tensor]) -> bool:
    return len(held) == len(current) and all(a is b for a, b in zip(held, current))


def _trainable(module: Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad and p.is_floating_point()]


def _average(comm: Communicator, buckets: list[Bucket]) -> None:
    if comm.size == 1:
        return
    for bucket in buckets:
        comm.allreduce_(bucket.pack(), "mean")
        bucket.unpack()


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

    Members must start from different weights: when a fit starts with the same weights on every rank (a shared
    seed), each member is re-initialised once with a rank-dependent seed; a later fit (fine-tuning, or continuing
    after ``fit`` returned) finds the members different and continues from them. Validation, test and predict
    give every rank all samples in the same order; the module's ``forward`` then returns the combined output of
    all members (see :mod:`lightning_mpi.voting`; tuples, lists and dicts of tensors are combined leaf by leaf),
    so metrics and predictions see the ensemble. ``member_outputs`` holds the last gathered per-member outputs
    (``[members, batch, ...]``, or the same structure as the outputs) for per-member metrics. One rank is one
    member: it then trains and evaluates exactly like a single-device Trainer.
    """

    name = "ensemble"
    evaluates_all_samples = True
    identical_replicas = False

    def __init__(self, voting: str = "hard", seed: int | None = None) -> None:
        super().__init__()
        self.combine = combiner(voting)
        self.voting = voting
        self.seed = seed
        self.member_outputs: Any = None

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        if fitting and not resuming and comm.size > 1 and _same_on_every_rank(comm, module):
            base = self.seed if self.seed is not None else torch.initial_seed()
            torch.manual_seed((base + 7919 * comm.rank) % 2**63)
            for sub in module.modules():
                if sub is not module and callable(getattr(sub, "reset_parameters", None)):
                    sub.reset_parameters()

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        if self.comm.size == 1:
            yield
            return
        original = module.forward
        own = module.__dict__.get("forward")

        def ensemble_forward(*args: Any, **kwargs: Any) -> Any:
            members = apply_to_collection(original(*args, **kwargs), Tensor, self._gather)
            self.member_outputs = members
            return apply_to_collection(members, Tensor, self._combine)

        module.forward = ensemble_forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            if own is None:
                del module.forward
            else:
                module.forward = own  # type: ignore[method-assign]

    def _gather(self, output: Tensor) -> Tensor:
        return torch.stack(self.comm.allgather(output.detach()))

    def _combine(self, members: Tensor) -> Tensor:
        # Every rank holds the same gathered outputs, so every rank raises this error alike.
        voting.check_fits(self.voting, members)
        return self.combine(members)

    def evaluation_loader(self, dataloader: object, limit: int | None = None) -> object:
        return shard_evaluation_dataloader(dataloader, 1, 0)  # every member sees every sample, in order

    def collect_predictions(self, predictions: list[list[Any]], interleaved: bool = False) -> None:
        """Every rank already holds the ensemble's predictions for every sample."""

    def restores_rank_states(self, fitting: bool) -> bool:
        return True  # every rank evaluates (or continues training) its own member

    def state_dict(self) -> dict[str, Any]:
        return {"voting": self.voting}


def _same_on_every_rank(comm: Communicator, module: Module) -> bool:
    """Whether every rank holds exactly the same parameters (one fingerprint per rank, compared)."""
    digest = hashlib.blake2b(digest_size=16)
    for p in module.parameters():
        if not is_lazy(p):
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return len(set(comm.allgather_object(digest.hexdigest()))) == 1


def make_policy(
    sync: str,
    every_n_steps: int | None = None,
    every_n_epochs: int | None = None,
    warmup_steps: int = 0,
    average_optimizer_state: bool = False,
    voting: str | None = None,
    seed: int | None = None,
    bucket_mb: float | None = None,
    overlap: bool | None = None,
    outer_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
    pseudo_gradient_dtype: torch.dtype | str | None = None,
) -> SyncPolicy:
    """The policy of ``MPIStrategy(sync=...)``, refusing options that belong to another mode."""
    if bucket_mb is not None and (
        isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not math.isfinite(bucket_mb)
        or bucket_mb <= 0
    ):
        raise ValueError(
            f"bucket_mb={bucket_mb!r} is not valid: give the capacity of a communication buffer in MiB (a positive "
            "number, e.g. 25), or None for the default."
        )
    averaging_options = (
        every_n_steps is not None or every_n_epochs is not None or warmup_steps or average_optimizer_state
        or outer_optimizer is not None or pseudo_gradient_dtype is not None
    )
    if sync != "average" and averaging_options:
        raise ValueError(
            "every_n_steps, every_n_epochs, warmup_steps, average_optimizer_state, outer_optimizer and "
            f"pseudo_gradient_dtype only apply to MPIStrategy(sync='average', ...), not sync={sync!r}."
        )
    if sync != "ensemble" and voting is not None:
        raise ValueError(f"voting={voting!r} only applies to MPIStrategy(sync='ensemble'), not sync={sync!r}.")
    if sync != "allreduce" and overlap:
        raise ValueError(f"overlap=True only applies to MPIStrategy(sync='allreduce'), not sync={sync!r}.")
    if sync == "allreduce":
        return GradientAllreduce(bucket_mb, overlap)
    if sync == "average":
        averaging = (every_n_steps, every_n_epochs, warmup_steps, average_optimizer_state)
        return ParameterAveraging(*averaging, bucket_mb or DEFAULT_BUCKET_MB, outer_optimizer, pseudo_gradient_dtype)
    if sync == "ensemble":
        return Ensemble(voting or "hard", seed)
    raise ValueError(f"sync={sync!r} is not known: choose 'allreduce', 'average' or 'ensemble'.")


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
