"""Reductions on a background thread, so that communication overlaps with backward."""

from __future__ import annotations

import atexit
import queue
import threading
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_mpi.comm.base import Reduction

if TYPE_CHECKING:
    from lightning_mpi.comm.mpi import MPICommunicator


class _MPIReduction(Reduction):
    """An in-place ``Allreduce`` of a contiguous host buffer, described to MPI once; started ones run, in the order
    they were started (the same on every rank), on the communicator's background thread."""

    def __init__(self, owner: MPICommunicator, tensor: Tensor, mpi_op: Any, op: str) -> None:
        super().__init__(self.run)
        self._owner, self._tensor, self._mpi_op, self._op = owner, tensor, mpi_op, op
        self._buffer, self._nbytes = tensor.detach().numpy(), tensor.numel() * tensor.element_size()
        self._done = threading.Event()
        self._in_background = False
        self._error: BaseException | None = None

    def run(self) -> Tensor:
        owner = self._owner
        if owner._same_calls_reason is not None:
            owner._check_same_call("allreduce", self._tensor, self._op)
        owner._watched_allreduce(self._buffer, self._mpi_op, self._tensor)
        owner._bytes += self._nbytes
        return self._tensor

    def start(self) -> None:
        background = self._owner._background
        if background is None or self._owner._same_calls_reason is not None:
            self.run()  # no thread (or ranks must be checked call by call, on the main communicator)
            return
        self._done.clear()
        self._error = None
        self._in_background = True
        background.submit(self)

    def execute(self, comm: Any) -> None:
        """On the background thread: reduce on its communicator (never mixed with the main thread's)."""
        try:
            self._owner._watched_allreduce(self._buffer, self._mpi_op, self._tensor, comm)
            self._owner._bytes += self._nbytes
        except BaseException as error:
            self._error = error
        finally:
            self._done.set()

    def wait(self) -> None:
        if not self._in_background:
            return  # run at once (or never started)
        self._done.wait()
        self._in_background = False
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _Background:
    """One thread running started reductions one after the other, on a communicator of its own.

    Every rank starts the same reductions in the same order (gradient buckets in bucket order), so they pair up.
    MPI's blocking calls release the GIL, so the starting thread computes meanwhile (backward goes on).
    """

    def __init__(self, comm: Any) -> None:
        self._comm = comm
        self._jobs: queue.SimpleQueue[_MPIReduction | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lightning-mpi-reductions", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # before mpi4py's MPI_Finalize (atexit is last-in, first-out)

    def submit(self, job: _MPIReduction) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.execute(self._comm)
