"""torch.distributed over MPI: the ``"mpi4py"`` backend and the ``mpi4py://`` rendezvous.

Under ``mpirun``/``srun``, a plain PyTorch script starts it with::

    import lightning_mpi  # registers the backend; initialises nothing
    torch.distributed.init_process_group("mpi4py", init_method="mpi4py://")

Ranks and world size come from MPI, and no ``MASTER_ADDR``/``MASTER_PORT`` is needed: the store that other backends
use (``new_group(backend="gloo")``) is served by rank 0 on a port it picks, its address sent over MPI
(:mod:`lightning_mpi.distributed.store`). Without an MPI launcher it is a world of one process. Every call of
torch.distributed that reaches a process group from Python works (see
:class:`~lightning_mpi.distributed.process_group.MPIProcessGroup`); calls that torch routes to a C++ backend only
(``torch.distributed._functional_collectives``' all-gather and reduce-scatter, ``monitored_barrier``,
``batch_isend_irecv``'s coalescing) are listed in the docs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lightning_mpi.comm import Communicator, MPICommunicator, world
from lightning_mpi.distributed.process_group import BACKEND, MPIProcessGroup
from lightning_mpi.distributed.store import shared_store

__all__ = ["BACKEND", "MPIProcessGroup", "init_process_group", "register"]

_SCHEME = "mpi4py"


def register() -> None:
    """Make ``"mpi4py"`` a torch.distributed backend and ``mpi4py://`` an ``init_method``; initialises nothing.
    Idempotent. Other backends stay the defaults of their devices."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    if _SCHEME not in rendezvous._rendezvous_handlers:
        rendezvous.register_rendezvous_handler(_SCHEME, _rendezvous)


def init_process_group(timeout: float | None = None) -> None:
    """``torch.distributed.init_process_group("mpi4py", init_method="mpi4py://")`` unless a default group exists;
    ``timeout``: seconds a collective may stall before the job is reported and aborted (``None``: torch's default)."""
    if not dist.is_initialized():
        seconds = timedelta(seconds=timeout) if timeout else None
        dist.init_process_group(BACKEND, init_method=f"{_SCHEME}://", timeout=seconds)


def _rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
    """Rank and size from MPI; a store shared by every rank (the mpi4py backend never uses it, gloo sub-groups do)."""
    comm = world()
    yield shared_store(comm, timeout), comm.rank, comm.size


def _create(options: Any, backend_options: Any) -> MPIProcessGroup:
    """torch's creator hook: the default group duplicates the job's communicator; a sub-group (``new_group``) is
    made by its members alone, as torch calls this on them only."""
    timeout = options.timeout.total_seconds() if options.timeout else None
    parent = world()
    ranks = list(options.global_ranks_in_group)
    if not isinstance(parent, MPICommunicator):
        return MPIProcessGroup(Communicator(), threaded=False)
    if not ranks and timeout:
        parent.set_timeout(timeout)  # the default group's timeout: the job's stall monitor watches every group
    comm = parent.subgroup(ranks or list(range(parent.size)), timeout)
    return MPIProcessGroup(comm, threaded=comm.thread_multiple)
