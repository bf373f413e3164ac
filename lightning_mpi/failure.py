"""Ending the whole MPI job when one rank fails, before anything can wait on the failed rank."""

from __future__ import annotations

import sys
from types import TracebackType

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_mpi.comm import Communicator, abort_on_exception


def is_collective_stop(exception: BaseException) -> bool:
    """A SIGTERM stop: every rank raises it after the same batch (the strategy agrees on it), so nobody waits."""
    return isinstance(exception, SIGTERMException)


class AbortOnFailure(Callback):
    """Put first among the Trainer's callbacks: aborts the job before other ``on_exception`` hooks run.

    Those hooks may communicate (``ModelCheckpoint(save_on_exception=True)`` saves, which is a collective) on
    the failing rank alone, which would wait for ranks that never come.
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.comm.size > 1 and not is_collective_stop(exception):
            abort_on_exception(self.comm, exception)


def abort_on_uncaught_exceptions(comm: Communicator) -> None:
    """Make an exception that escapes the script (outside any Trainer call) abort the job.

    Without this, the failed rank's interpreter exits into ``MPI_Finalize``, which waits for the other ranks
    while they wait in their next collective.
    """
    previous = sys.excepthook
    if getattr(previous, "lightning_mpi", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if comm.size > 1 and not isinstance(value, (KeyboardInterrupt, SystemExit)):
            abort_on_exception(comm, value)
        previous(kind, value, tb)

    hook.lightning_mpi = True  # type: ignore[attr-defined]
    sys.excepthook = hook
