"""What a synchronisation of :class:`~lightning_mpi.policies.averaging.ParameterAveraging` does to the model.

The policy owns the schedule (when to synchronise, the warm-up, evaluation between synchronisations, checkpoints);
an averager owns the arithmetic: :class:`MeanAverage` (local SGD: the mean of the ranks' models) or
:class:`~lightning_mpi.policies.diloco.OuterStep` (DiLoCo: an outer optimizer's step on the mean of the ranks'
changes). Both communicate: every rank calls them at the same point.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn import Module

from lightning_mpi.buffers import Bucket, bucketize
from lightning_mpi.comm import Communicator
from lightning_mpi.policies.base import floating_state, same_tensors


class ModelBuckets:
    """A module's floating-point parameters and buffers in flat buckets (built on first use, when lazy modules are
    materialised), rebuilt when a callback or the module replaced tensors (SWA's BatchNorm reset, a buffer
    registered again): synchronising must reach the module's own tensors."""

    def __init__(self, module: Module, bucket_mb: float) -> None:
        self.module = module
        self.bucket_mb = bucket_mb
        self._all: list[Bucket] | None = None
        self._rest: dict[frozenset[int], list[Bucket]] = {}

    def all(self) -> list[Bucket]:
        """Every floating-point parameter and buffer."""
        state = floating_state(self.module)
        built = [t for bucket in self._all or [] for t in bucket.tensors]
        if self._all is None or not same_tensors(built, state):
            self._all = bucketize(state, self.bucket_mb)
            self._rest = {}
        return self._all

    def excluding(self, tensors: list[Tensor]) -> list[Bucket]:
        """Every floating-point parameter and buffer but ``tensors``."""
        self.all()  # forgets the rest's buckets if the module's tensors were replaced
        skip = frozenset(id(t) for t in tensors)
        if skip not in self._rest:
            self._rest[skip] = bucketize([t for t in floating_state(self.module) if id(t) not in skip], self.bucket_mb)
        return self._rest[skip]

    def values(self) -> list[Tensor]:
        """A copy of the state, for :meth:`load`."""
        return [bucket.pack().clone() for bucket in self.all()]

    def load(self, values: list[Tensor]) -> None:
        """Put :meth:`values` back into the module's tensors."""
        for bucket, saved in zip(self.all(), values):
            bucket.flat.copy_(saved)
            bucket.unpack()


def average_buckets(comm: Communicator, buckets: list[Bucket]) -> None:
    """Replace every bucket's tensors by their mean over the ranks."""
    if comm.size == 1:
        return
    for bucket in buckets:
        comm.allreduce_(bucket.pack(), "mean")
        bucket.unpack()


class Averager:
    """The arithmetic of a synchronisation. Subclasses that keep state across synchronisations (DiLoCo's outer
    optimizer) override the state hooks; the mean keeps none."""

    def attach(self, module: Module, restore: bool) -> None:
        """Training starts on ``module`` (the same on every rank), or continues from a checkpoint (``restore``)."""

    def reset(self) -> None:
        """The replicas are equal now (a warm-up ended, a fit resumed from the synchronised model)."""

    def synchronise(self, comm: Communicator, model: ModelBuckets) -> None:
        """Turn every rank's model into the synchronised one."""
        raise NotImplementedError

    def settle(self, comm: Communicator, model: ModelBuckets) -> None:
        """At the end of fit, when the parameters are the last synchronisation's already: make what may have moved
        since (buffers: a forward without a step) equal, without moving the parameters."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """This averager's state, to :meth:`restore` after a synchronisation evaluation only previewed."""
        return None

    def restore(self, snapshot: Any) -> None:
        """Back to a :meth:`snapshot`."""

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of this averager (``None``: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict` (applied at the next :meth:`attach`)."""


class MeanAverage(Averager):
    """Local SGD's synchronisation: every floating-point parameter and buffer becomes its mean over the ranks."""

    def synchronise(self, comm: Communicator, model: ModelBuckets) -> None:
        average_buckets(comm, model.all())

    def settle(self, comm: Communicator, model: ModelBuckets) -> None:
        average_buckets(comm, model.all())  # the mean of equal parameters is the parameters
