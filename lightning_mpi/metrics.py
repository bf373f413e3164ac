"""Metrics and logged values over MPI.

torchmetrics synchronises a metric on ``compute()`` through ``torch.distributed`` when it is initialised (under
:class:`~lightning_mpi.MPIStrategy` it is: the ``"mpi4py"`` group), and not at all otherwise.
:func:`sync_metrics` points every metric found in a module (including those inside ``ModuleDict`` and
``MetricCollection``) at the strategy's communicator directly, and leaves them unsynchronised where the strategy
is not distributed (an ensemble's evaluation, where every rank already sees every sample). The strategy does this
for the LightningModule during setup and before every evaluation loop; call it yourself for metrics that live
outside the module::

    from lightning_mpi import sync_metrics
    accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)
    sync_metrics(accuracy)  # accuracy.compute() now covers all ranks
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from lightning_mpi.comm import Communicator, reduce_op_name, world


class _MPIGather:
    """A torchmetrics ``dist_sync_fn``: one tensor per rank, first dimensions may differ (cat states)."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def __call__(self, tensor: Tensor, group: Any = None) -> list[Tensor]:
        return self.comm.allgather(tensor)


def sync_metrics(module: Module, comm: Communicator | None = None, active: Callable[[], bool] | None = None) -> int:
    """Make every torchmetrics ``Metric`` in ``module`` (or ``module`` itself) sync over MPI on ``compute()``.

    A metric that already has its own ``dist_sync_fn`` is left alone. Returns how many metrics were attached.
    Must be called with the same metrics on every rank, since ``compute()`` becomes a collective.
    ``active`` decides at each ``compute()`` whether to sync (default: whenever there are several ranks); the
    strategy turns syncing off where every rank already saw every sample (ensemble evaluation).
    """
    from torchmetrics import Metric

    comm = comm if comm is not None else world()
    attached = 0
    for sub in module.modules():
        if not isinstance(sub, Metric):
            continue
        current = sub.dist_sync_fn
        if current is None or isinstance(current, _MPIGather):
            sub.dist_sync_fn = _MPIGather(comm)
            sub.distributed_available_fn = active or _available(comm)
            attached += 1
    return attached


def _available(comm: Communicator) -> Callable[[], bool]:
    def available() -> bool:
        return comm.size > 1

    return available


def reduce_logged(comm: Communicator, tensor: Tensor | Any, reduce_op: Any = "mean") -> Tensor | Any:
    """A reduced copy of ``tensor`` over all ranks, as Lightning's ``Strategy.reduce`` (``self.log(...,
    sync_dist=True)``) expects: non-tensors come back as they are, integers averaged with ``"mean"`` as floats
    (Lightning's dtype for logged values)."""
    if not isinstance(tensor, Tensor):
        return tensor
    op = reduce_op_name(reduce_op)
    out = tensor.detach().clone()
    if op == "mean" and not out.is_floating_point():
        out = out.to(torch.get_default_dtype())
    return comm.allreduce_(out, op)
