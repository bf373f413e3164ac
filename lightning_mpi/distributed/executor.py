"""Runs a process group's collectives in the order they were issued: at once when nothing is pending, otherwise
(and for ``async_op=True``) on a thread of the group's own, so that asynchronous work really overlaps."""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable
from typing import Any

from torch.futures import Future

Job = Callable[[], Any]


class OrderedExecutor:
    """Every rank issues a group's collectives in the same order; MPI needs them run in that order too.

    A synchronous call with nothing pending runs on the caller's thread (no hand-over: the common, fast path).
    Asynchronous calls, and synchronous ones issued while asynchronous ones are still pending, queue behind the
    pending ones and run on the group's thread. One collective runs at a time.

    Args:
        threaded: whether MPI serves several threads (``MPI_THREAD_MULTIPLE``); if not, asynchronous calls run
            at once and their work is complete when returned.
    """

    def __init__(self, threaded: bool) -> None:
        self._threaded = threaded
        self._state = threading.Lock()  # guards _pending and the queue's order
        self._running = threading.Lock()  # held while a collective runs
        self._pending = 0
        self._jobs: queue.SimpleQueue[tuple[Job, Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job, asynchronous: bool) -> Future[Any]:
        """Run ``job`` in issue order; the future holds its result (or exception). A synchronous call returns once
        ``job`` ran, raising what it raised."""
        future: Future[Any] = Future()
        with self._state:
            queued = self._threaded and (asynchronous or self._pending > 0)
            if queued:
                self._pending += 1
                self._start_thread()
                self._jobs.put((job, future))
            else:
                self._running.acquire()
        if queued:
            if not asynchronous:
                future.wait()
            return future
        try:
            future.set_result(job())
        except BaseException as error:
            future.set_exception(error)
            raise
        finally:
            self._running.release()
        return future

    def run_if_idle(self, job: Job) -> bool:
        """Run ``job`` now, on this thread, if nothing is pending (the fast path of synchronous calls, with no
        future); ``False`` (and nothing run) if something is, or asynchronous calls run on the thread here."""
        with self._state:
            if self._pending:
                return False
            self._running.acquire()
        try:
            job()
        finally:
            self._running.release()
        return True

    def stop(self) -> None:
        """Let queued work finish, then end the thread (before MPI is finalized)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10.0)
            self._thread = None

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lightning-mpi-process-group", daemon=True)
            self._thread.start()
            atexit.register(self.stop)  # runs before mpi4py's MPI_Finalize (atexit is last-in, first-out)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            error: BaseException | None = None
            result: Any = None
            with self._running:
                try:
                    result = job()
                except BaseException as caught:
                    error = caught
            with self._state:
                self._pending -= 1
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
