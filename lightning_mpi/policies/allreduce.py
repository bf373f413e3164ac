"""Gradient allreduce: synchronous data parallelism (``MPIStrategy(sync="allreduce")``)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from lightning_mpi.buffers import DEFAULT_BUCKET_MB, OVERLAP_BUCKET_MB, ByteBucket, bucketize, validate_bucket_mb
from lightning_mpi.comm import Communicator
from lightning_mpi.policies.base import SyncPolicy, broadcast_module, has_lazy_tensors, same_tensors
from lightning_mpi.policies.bucket import GradientBucket
from lightning_mpi.signals import FlagChannel

_SPARSE_MODULES = (torch.nn.Embedding, torch.nn.EmbeddingBag)


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

    Args:
        bucket_mb: capacity of a flat communication buffer in MiB (``None``: 25 without overlap, 16 with it).
        overlap: reduce each bucket on a background thread as soon as its gradients are in (``None``: off).
    """

    name = "allreduce"
    syncs_gradients = True
    ranks_differ = False

    def __init__(self, *, bucket_mb: float | None = None, overlap: bool | None = None) -> None:
        super().__init__()
        self.bucket_mb = validate_bucket_mb(bucket_mb)
        self.overlap = overlap
        self._overlapping = False
        self._launching = False
        self._next_launch = 0
        #: buckets whose reduction started while backward was still running (overlap), since setup
        self.overlapped_buckets = 0
        self._buckets: list[GradientBucket] | None = None
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
        trainable: list[Tensor] = [p for p in module.parameters() if p.requires_grad and not is_lazy(p)]
        self._sparse = [p for p in trainable if id(p) in sparse]
        dense = [p for p in trainable if id(p) not in sparse]
        if self._overlapping:
            dense.reverse()  # the order in which backward produces the gradients, roughly
        default_mb = OVERLAP_BUCKET_MB if self._overlapping else DEFAULT_BUCKET_MB
        # The tail of each bucket carries one flag per parameter (how many ranks produced a gradient), then the
        # flag of the policy's FlagChannel: a SIGTERM agreement travels with the gradients, no collective of its own.
        buckets = bucketize(dense, self.bucket_mb or default_mb, extra_per_tensor=1, extra_per_bucket=1)
        self._buckets = [GradientBucket(b, self.comm) for b in buckets]
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

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (and deep-copyable, as ``deepcopy(trainer.callbacks)`` reaches the strategy): the buckets, their
        prepared requests and gradient hooks belong to the running job and are built again at setup."""
        state = dict(self.__dict__)
        state.update(_buckets=None, _hooks=[], _buffers=None, _sparse=[], _trainable=[], _sparse_reduced=set())
        return state

    def _trainable_changed(self, module: Module) -> bool:
        current: list[Tensor] = [p for p in module.parameters() if p.requires_grad]
        return not same_tensors(self._trainable, current)

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
            if self._buffers is None or not same_tensors(self._buffers.tensors, buffers):
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
            grad = (
                p.grad.coalesce()
                if p.grad is not None
                else torch.sparse_coo_tensor(
                    torch.zeros((1, 0), dtype=torch.int64), torch.zeros((0, *p.shape[1:]), dtype=p.dtype), p.shape
                )
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
