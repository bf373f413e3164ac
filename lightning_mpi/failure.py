"""What a rank does when it fails: propagate the exception if every rank failed alike, else end the whole job.

A rank that leaves alone leaves the others waiting forever in their next collective. But when every rank raises
(a bad hyper-parameter caught by ``try``/``except`` around ``fit``, a test's ``pytest.raises``), the exception
must propagate on every rank as in one process, so that ``on_exception`` callbacks run (and may communicate:
``ModelCheckpoint(save_on_exception=True)`` saves, which is a collective).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.utilities.exceptions import SIGTERMException, _TunerExitException
from typing_extensions import override

from lightning_mpi.comm import Communicator, abort_on_exception

_AGREED = "_lightning_mpi_every_rank_failed"


def is_collective_stop(exception: BaseException) -> bool:
    """A SIGTERM stop: every rank raises it after the same batch (the strategy agrees on it), so nobody waits."""
    return isinstance(exception, SIGTERMException)


def end_job_unless_every_rank_failed(comm: Communicator, exception: BaseException) -> None:
    """Return if the exception may propagate (one rank, a SIGTERM stop, or every rank failed); otherwise print
    this rank's traceback and abort every rank of the job. Asks the other ranks once per exception."""
    if comm.size == 1 or is_collective_stop(exception) or hasattr(exception, _AGREED):
        return
    summaries = comm.all_ranks_failed(_summary(exception))
    if summaries is not None:
        setattr(exception, _AGREED, summaries)
        return
    abort_on_exception(comm, exception)


def _summary(exception: BaseException) -> str:
    return f"{type(exception).__name__}: {exception}"


def said_instead_of_traceback(comm: Communicator, exception: BaseException) -> bool:
    """When every rank failed, only the lowest rank with a given exception prints its traceback: on the others
    this prints one line naming that rank and returns ``True`` (the caller prints nothing more). ``False`` where
    this rank's traceback is to be printed (an exception no lower rank reported, or ranks that did not agree)."""
    summaries: dict[int, str] = getattr(exception, _AGREED, {})
    mine = _summary(exception)
    printer = min((r for r, summary in summaries.items() if summary == mine and r < comm.rank), default=None)
    if printer is None:
        return False
    one_line = " ".join(mine.split())
    if len(one_line) > 160:
        one_line = one_line[:157] + "..."
    print(
        f"[lightning-mpi] rank {comm.rank}/{comm.size}: {one_line} (the same exception as rank {printer}, "
        "which printed its traceback)",
        file=sys.stderr,
        flush=True,
    )
    return True


class DecideOnFailure(_Launcher):
    """MPIStrategy's launcher: the MPI launcher started the processes, so the Trainer's function runs right here;
    when it raises, this decides at once whether every rank failed (the exception propagates) or the job must end,
    before Lightning's ``on_exception`` hooks run, which may communicate and would wait forever for ranks that did
    not fail. (A callback first in ``trainer.callbacks`` did this before; the user's callback list is theirs.)

    Args:
        communicator: the job's communicator, or ``None`` while it does not exist yet (nothing to decide then).
    """

    def __init__(self, communicator: Callable[[], Communicator | None]) -> None:
        self._communicator = communicator

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return True

    @override
    def launch(self, function: Callable[..., Any], *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except _TunerExitException:
            raise  # the tuner's way of ending a trial on every rank alike, not a failure
        except BaseException as exception:
            comm = self._communicator()
            if comm is not None:
                end_job_unless_every_rank_failed(comm, exception)
            raise

    @override
    def kill(self, signum: Any) -> None:
        """Nothing to kill: the MPI launcher owns the processes."""


def abort_on_uncaught_exceptions(comm: Communicator) -> None:
    """Make an exception that escapes the script (outside any Trainer call) on some ranks only abort the job, and
    one that every rank raised alike print its traceback once (:func:`said_instead_of_traceback`).

    Without this, the failed rank's interpreter exits into ``MPI_Finalize``, which waits for the other ranks
    while they wait in their next collective.
    """
    previous = sys.excepthook
    if getattr(previous, "lightning_mpi", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(value, (KeyboardInterrupt, SystemExit)):
            end_job_unless_every_rank_failed(comm, value)
            if said_instead_of_traceback(comm, value):
                return
        previous(kind, value, tb)

    hook.lightning_mpi = True  # type: ignore[attr-defined]
    sys.excepthook = hook
