"""Every mpi4py call of lightning-mpi lives in this package (launcher, base twin, mpi, overlap, monitor).

The rest of the package talks to a :class:`Communicator`: the MPI one when the process was started by an MPI
launcher, or its single-process twin otherwise (so a plain ``python train.py`` never initialises MPI and
behaves like a single-device run). Nothing here knows about Lightning.

Tensors cross the wire as buffers: a contiguous CPU tensor is handed to MPI as a numpy view of its own
memory (no copy). Anything else (non-contiguous, 16-bit floats for reductions, CUDA without a CUDA-aware MPI)
is staged through a temporary host tensor and copied back.
"""

from __future__ import annotations

import sys
import traceback

from lightning_mpi.comm.base import (
    CollectiveMismatch,
    Communicator,
    ReduceOpName,
    Reduction,
    TrafficMeter,
    reduce_op_name,
    validate_timeout,
)
from lightning_mpi.comm.launcher import (
    LAUNCHER_VARIABLES,
    launched_by_mpi,
    launcher_rank,
    launcher_size,
    launcher_tasks,
    mpi_library,
    mpi_world_size,
)
from lightning_mpi.comm.mpi import ABORT_GRACE, MPICommunicator

__all__ = [
    "ABORT_GRACE",
    "LAUNCHER_VARIABLES",
    "CollectiveMismatch",
    "Communicator",
    "MPICommunicator",
    "ReduceOpName",
    "Reduction",
    "TrafficMeter",
    "abort_on_exception",
    "launched_by_mpi",
    "launcher_rank",
    "launcher_size",
    "launcher_tasks",
    "mpi_library",
    "mpi_world_size",
    "reduce_op_name",
    "validate_timeout",
    "world",
]

_WORLD: Communicator | None = None


def world(timeout: float | None | object = ...) -> Communicator:
    """The communicator over all ranks of this job, created on first use (this initialises MPI if needed).

    Under an MPI launcher (or once mpi4py has initialised MPI) it is an :class:`MPICommunicator`;
    otherwise the single-process :class:`Communicator`, and MPI is never initialised. ``timeout`` (seconds before a
    stalled collective aborts the job; default 600 at creation) replaces the current one if given.
    """
    global _WORLD
    if _WORLD is None:
        seconds = 600.0 if timeout is ... else timeout
        _WORLD = MPICommunicator(timeout=seconds) if launched_by_mpi() or _mpi_initialized() else Communicator()  # type: ignore[arg-type]
    elif timeout is not ...:
        _WORLD.set_timeout(timeout)  # type: ignore[arg-type]
    return _WORLD


def _mpi_initialized() -> bool:
    mod = sys.modules.get("mpi4py.MPI")
    return bool(mod is not None and mod.Is_initialized() and mod.COMM_WORLD.Get_size() > 1)


def abort_on_exception(comm: Communicator, exception: BaseException) -> None:
    """Print ``exception`` with this rank's number, then end every rank of the job."""
    tb = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
    # The process's own stderr: an excepthook may have redirected sys.stderr into a buffer it never gets to print.
    stream = sys.__stderr__ or sys.stderr
    print(f"[lightning-mpi] rank {comm.rank}/{comm.size} failed:\n{tb}", file=stream, flush=True)
    comm.abort(1)
