"""Stopping every rank after the same training batch when one rank receives SIGTERM (Slurm's time limit)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch

from lightning_mpi.comm import Communicator


class FlagChannel:
    """One 0/1 flag per rank that rides on a collective the policy makes anyway (the gradient allreduce).

    The owner writes ``outgoing`` (set by :meth:`send`) into its buffer before the collective and calls
    :meth:`deliver` with the sum over ranks after it; :meth:`take` then tells every rank alike whether any rank had
    set the flag.
    """

    def __init__(self) -> None:
        #: this rank's flag, for the next collective
        self.outgoing = False
        self._any = False

    def send(self, value: bool) -> None:
        """Set this rank's flag for the next collective."""
        self.outgoing = value

    def deliver(self, count: float) -> None:
        """The sum over ranks of the flags that a collective carried."""
        self._any = self._any or count > 0

    def take(self) -> bool:
        """Whether any rank set the flag in a collective since the last call."""
        seen, self._any = self._any, False
        return seen


class StopAgreement:
    """Every rank learns, at the same training batch, that some rank received SIGTERM.

    Lightning reacts to SIGTERM where it arrives and shares it through ``torch.distributed`` only, so the
    signalled rank would leave alone while the others wait in their next collective. Here the signal is only noted,
    and the request is agreed before every training batch: on the policy's :class:`FlagChannel` where it has one
    (no collective of its own), else with one 4-byte allreduce every :attr:`every` batches.
    """

    every = 8

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.requested = False
        self._batches = 0

    def start(self) -> None:
        """At the start of fit: forget earlier requests and take SIGTERM over (main thread, several ranks)."""
        self.requested = False
        self._batches = 0
        if self.comm.size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        print(
            f"[lightning-mpi] rank {self.comm.rank} received SIGTERM: every rank stops after the same batch soon",
            file=sys.stderr,
            flush=True,
        )
        self.requested = True

    def agreed(self, channel: FlagChannel | None) -> bool:
        """Called before every training batch, on every rank: whether the ranks agreed to stop (the same answer
        on every rank)."""
        batch, self._batches = self._batches, self._batches + 1
        if self.comm.size == 1:
            return False
        if channel is not None:
            channel.send(self.requested)
            return channel.take()
        if batch % self.every:
            return False
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        return bool(self.comm.allreduce_(flag, "max").item())
