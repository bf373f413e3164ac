"""The stall monitor: reports and aborts a collective that waits too long, and tells whether every rank failed."""

from __future__ import annotations

import atexit
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from lightning_mpi.comm.mpi import MPICommunicator


class _Monitor:
    """A daemon thread beside each rank's main thread, talking to the other ranks on a communicator of its own.

    It answers other ranks' questions about what this rank is doing (in which collective, or in none), reports
    and aborts a collective that stalls longer than ``timeout`` seconds (``None``: never), and lets ranks that
    fail find out whether every rank failed. The hot path only stores the operation's name and start time.
    Collectives are numbered in call order, identically on every rank: the same number on two ranks is the same
    call, unless the ranks ran different code paths.
    """

    _QUERY, _STALL_REPLY, _FAILURE_REPLY, _EVERY_RANK_FAILED = 7001, 7002, 7003, 7004
    _PERIOD = 0.05

    def __init__(self, comm: MPICommunicator, timeout: float | None) -> None:
        self._comm = comm
        self.timeout = timeout
        self._stopped = threading.Event()
        self._op: str | None = None
        self._since = 0.0
        self._count = 0
        self._tensor: Tensor | None = None
        self._last = "none yet"
        #: how many failures this rank has been through; ranks that fail together count alike
        self._failures = 0
        self._failure = ""  # the latest failure's summary, told to the ranks that ask
        # Status queries travel on a communicator of their own, never mixed with the collectives they watch.
        self._side = comm._comm.Dup()
        self._thread = threading.Thread(target=self._run, name="lightning-mpi-monitor", daemon=True)
        self._thread.start()
        # Runs before mpi4py's own atexit MPI_Finalize (atexit is last-in, first-out): no MPI call may follow it.
        atexit.register(self.stop)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2.0)

    def enter(self, kind: str, tensor: Tensor | None) -> None:
        self._count += 1
        self._since = time.monotonic()
        self._tensor = tensor
        self._op = kind

    def exit(self) -> None:
        self._last = self._op or self._last
        self._op = None

    # -- what this rank is doing -------------------------------------------------------------------------

    def _describe(self, kind: str) -> str:
        tensor = self._tensor
        return kind if tensor is None else f"{kind} of {tuple(tensor.shape)} {tensor.dtype}"

    def _status(self) -> dict[str, Any]:
        op = self._op
        status = {
            "count": self._count,
            "failures": self._failures,
            "failure": self._failure,
            "context": self._comm.context or "no step",
        }
        if op is None:
            return {
                **status,
                "op": None,
                "text": f"not in a collective ({status['context']}; last finished: #{self._count} {self._last})",
            }
        waited = time.monotonic() - self._since
        return {
            **status,
            "op": op,
            "text": f"waiting {waited:.0f} s in #{self._count} {self._describe(op)} ({status['context']})",
        }

    # -- the thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.wait(self._PERIOD):
            try:
                self._answer_queries()
                op, timeout = self._op, self.timeout
                if op is not None and timeout is not None and time.monotonic() - self._since > timeout:
                    self._report_stall_and_abort(op, timeout)
            except Exception as err:
                print(f"[lightning-mpi] rank {self._comm.rank}: monitor error {err!r}", file=sys.stderr, flush=True)

    def _answer_queries(self) -> None:
        # A matched probe: the message is ours alone even while another thread probes the same communicator.
        status = self._comm._MPI.Status()
        while message := self._side.improbe(source=self._comm._MPI.ANY_SOURCE, tag=self._QUERY, status=status):
            source, reply_tag = status.Get_source(), message.recv()
            self._side.send(self._status(), dest=source, tag=reply_tag)

    def _ask_everyone(self, reply_tag: int, seconds: float, ranks: list[int]) -> dict[int, dict[str, Any]]:
        """Every rank's status in ``ranks`` that answers within ``seconds`` (answering queries meanwhile)."""
        for r in ranks:
            self._side.isend(reply_tag, dest=r, tag=self._QUERY)
        replies: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + seconds
        status = self._comm._MPI.Status()
        while len(replies) < len(ranks) and time.monotonic() < deadline:
            message = self._side.improbe(source=self._comm._MPI.ANY_SOURCE, tag=reply_tag, status=status)
            if message is not None:
                replies[status.Get_source()] = message.recv()
            else:
                if threading.current_thread() is self._thread:
                    self._answer_queries()
                time.sleep(0.005)
        return replies

    # -- stalls ------------------------------------------------------------------------------------------

    def _report_stall_and_abort(self, op: str, timeout: float) -> None:
        me = self._comm.rank
        others = [r for r in range(self._comm.size) if r != me]
        replies = self._ask_everyone(self._STALL_REPLY, min(5.0, max(1.0, timeout)), others)
        mine = self._status()
        lines = [f"rank {me}: {mine['text']}"]
        lines += [
            f"rank {r}: {replies[r]['text'] if r in replies else 'no answer (process busy outside MPI, or gone)'}"
            for r in others
        ]
        same = [me] + [r for r, s in replies.items() if s["op"] == op and s["count"] == self._count]
        elsewhere = [r for r, s in replies.items() if s["op"] is not None and r not in same]
        missing = [r for r in range(self._comm.size) if r not in same]
        verdict = f"Ranks in this collective: {sorted(same)}; ranks that did not arrive: {missing}."
        if elsewhere:
            verdict += (
                f" Ranks {sorted(elsewhere)} wait in a different collective: the ranks called collectives in a "
                "different order (code that runs on some ranks only, or different numbers of batches per rank)."
            )
        print(
            f"[lightning-mpi] rank {me}: collective {self._describe(op)} did not complete within {timeout:g} s "
            f"({self._comm.context or 'no step'}). {verdict}\n  " + "\n  ".join(lines) + "\nAborting the job.",
            file=sys.stderr,
            flush=True,
        )
        self._comm.abort(3)

    # -- failures ----------------------------------------------------------------------------------------

    def all_ranks_failed(self, summary: str, patience: float) -> dict[int, str] | None:
        self._failure = summary
        self._failures += 1
        summaries = {self._comm.rank: summary}
        others = [r for r in range(self._comm.size) if r != self._comm.rank]
        waiting = list(others)
        deadline = time.monotonic() + patience
        while waiting and time.monotonic() < deadline:
            told = self._told_every_rank_failed()
            if told is not None:
                return {**told, **summaries}
            replies = self._ask_everyone(self._FAILURE_REPLY, 0.5, waiting)
            for rank, status in replies.items():
                if status["failures"] >= self._failures:
                    waiting.remove(rank)  # failed too (and perhaps already handling it in collectives)
                    summaries[rank] = status["failure"]
                elif status["op"] is not None:
                    return None  # waits in a collective for this rank, which will never come
        if waiting:
            return None
        # Tell the others, who may still be asking: a rank that knows may leave (and stop answering) right away.
        for r in others:
            self._side.send((self._failures, summaries), dest=r, tag=self._EVERY_RANK_FAILED)
        return summaries

    def _told_every_rank_failed(self) -> dict[int, str] | None:
        """Every rank's summary, if a rank that heard from all of them has said that every rank failed."""
        status = self._comm._MPI.Status()
        told = None
        while message := self._side.improbe(
            source=self._comm._MPI.ANY_SOURCE, tag=self._EVERY_RANK_FAILED, status=status
        ):
            failures, summaries = message.recv()
            if failures >= self._failures:  # older verdicts are stale
                told = summaries
        return told
