"""A job of N ranks inside one process, one thread per rank: for testing code that communicates (a policy, a
callback, a metric) without ``mpirun``.

>>> import torch
>>> run_ranks(3, lambda comm: comm.allreduce_(torch.tensor([float(comm.rank)]), "sum").item())
[3.0, 3.0, 3.0]

Each rank is a :class:`ThreadCommunicator`; a collective returns once every rank has called it, as over MPI. A rank
that never arrives fails the others after ``timeout`` seconds instead of hanging the test. Not for training speed:
the ranks share one interpreter and its cores.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_mpi.comm.base import Communicator, ReduceOpName, check_op

_REDUCE: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": lambda stacked: stacked.sum(0),
    "mean": lambda stacked: stacked.mean(0),
    "min": lambda stacked: stacked.min(0).values,
    "max": lambda stacked: stacked.max(0).values,
    "product": lambda stacked: stacked.prod(0),
    "band": lambda stacked: functools.reduce(torch.bitwise_and, stacked),
    "bor": lambda stacked: functools.reduce(torch.bitwise_or, stacked),
    "bxor": lambda stacked: functools.reduce(torch.bitwise_xor, stacked),
}


class Exchange:
    """Where the ranks' threads meet: each deposits a value, all read all of them (a collective fails after
    ``timeout`` seconds without every rank)."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list[Any] = [None] * size
        self._timeout = timeout

    def all(self, rank: int, value: Any) -> list[Any]:
        self._slots[rank] = value
        self._wait(rank)
        values = list(self._slots)
        self._wait(rank)  # no rank overwrites its slot before every rank has read them all
        return values

    def _wait(self, rank: int) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise RuntimeError(
                f"rank {rank}: a collective waited {self._timeout:g} s for ranks that never called it, or another "
                "rank failed (the ranks must call the same collectives in the same order)"
            ) from None

    def abort(self) -> None:
        self._barrier.abort()


class ThreadCommunicator(Communicator):
    """Rank ``rank`` of a job whose ranks are threads of this process (see :func:`run_ranks`); one node."""

    def __init__(self, exchange: Exchange, rank: int) -> None:
        self._exchange = exchange
        self.rank = self.local_rank = rank
        self.size = self.local_size = exchange.size
        self._bytes = 0

    def _all(self, value: Any) -> list[Any]:
        return self._exchange.all(self.rank, value)

    def _sent(self, tensor: Tensor) -> None:
        self._bytes += tensor.numel() * tensor.element_size()

    def allreduce_(self, tensor: Tensor, op: ReduceOpName = "sum") -> Tensor:
        check_op(tensor, op)
        self._sent(tensor)
        parts = self._all(tensor.detach().clone())
        with torch.no_grad():
            tensor.copy_(_REDUCE[op](torch.stack(parts)))
        return tensor

    def broadcast_(self, tensor: Tensor, root: int = 0) -> Tensor:
        self._sent(tensor)
        parts = self._all(tensor.detach().clone() if self.rank == root else None)
        with torch.no_grad():
            tensor.copy_(parts[root])
        return tensor

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return copy.deepcopy(self._all(obj)[root])  # each rank its own copy, as after unpickling

    def allgather(self, tensor: Tensor) -> list[Tensor]:
        self._sent(tensor)
        return [part.clone() for part in self._all(tensor.detach().clone())]

    def allgather_object(self, obj: Any) -> list[Any]:
        return copy.deepcopy(self._all(obj))

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        values = copy.deepcopy(self._all(obj))
        return values if self.rank == root else None

    def reduce_(self, tensor: Tensor, op: ReduceOpName, root: int) -> Tensor:
        reduced = self.allreduce_(tensor.clone(), op)
        if self.rank == root:
            with torch.no_grad():
                tensor.copy_(reduced)
        return tensor

    def allgather_into_(self, out: Tensor, tensor: Tensor, counts: list[int]) -> Tensor:
        flat = torch.cat([part.reshape(-1) for part in self.allgather(tensor)])
        with torch.no_grad():
            out.view(-1)[: flat.numel()].copy_(flat)
        return out

    def gather_into_(self, out: Tensor | None, tensor: Tensor, counts: list[int], root: int) -> None:
        flat = torch.cat([part.reshape(-1) for part in self.allgather(tensor)])
        if out is not None and self.rank == root:
            with torch.no_grad():
                out.view(-1)[: flat.numel()].copy_(flat)

    def scatter_from_(self, tensor: Tensor, source: Tensor | None, counts: list[int], root: int) -> None:
        parts = self._all(source.detach().reshape(-1).clone() if self.rank == root and source is not None else None)
        self._copy_mine(tensor, parts[root], counts)

    def reduce_scatter_(self, out: Tensor, tensor: Tensor, counts: list[int], op: ReduceOpName) -> Tensor:
        reduced = self.allreduce_(tensor.detach().clone(), op).reshape(-1)
        self._copy_mine(out, reduced, counts)
        return out

    def alltoallv_(self, out: Tensor, tensor: Tensor, out_counts: list[int], in_counts: list[int]) -> Tensor:
        self._sent(tensor)
        sent = self._all((tensor.detach().reshape(-1).clone(), list(in_counts)))
        chunks = []
        for flat, counts in sent:  # what each rank sent to this one, in the senders' order
            start = sum(counts[: self.rank])
            chunks.append(flat[start : start + counts[self.rank]])
        received = torch.cat(chunks)
        with torch.no_grad():
            out.view(-1)[: received.numel()].copy_(received)
        return out

    def _copy_mine(self, out: Tensor, flat: Tensor, counts: list[int]) -> None:
        start = sum(counts[: self.rank])
        with torch.no_grad():
            out.view(-1)[: counts[self.rank]].copy_(flat[start : start + counts[self.rank]])

    def send(self, tensor: Tensor, dest: int, tag: int) -> Any:
        raise NotImplementedError("point-to-point messages between thread ranks are not supported: use mpirun")

    def recv(self, tensor: Tensor, source: int | None, tag: int) -> Any:
        raise NotImplementedError("point-to-point messages between thread ranks are not supported: use mpirun")

    def subgroup(self, ranks: list[int], timeout: float | None) -> Communicator:
        raise NotImplementedError("sub-groups of thread ranks are not supported: use mpirun")

    def barrier(self) -> None:
        self._all(None)

    def abort(self, code: int = 1) -> None:
        self._exchange.abort()
        raise RuntimeError(f"rank {self.rank} aborted the job (code {code})")

    def bytes_sent(self) -> int:
        return self._bytes


def run_ranks(size: int, function: Callable[[ThreadCommunicator], Any], timeout: float = 60.0) -> list[Any]:
    """Run ``function(comm)`` on ``size`` ranks, one thread each; its return values in rank order. An exception on
    any rank fails the others' pending collectives and is raised here (the lowest rank's first)."""
    exchange = Exchange(size, timeout)
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def rank_main(rank: int) -> None:
        try:
            results[rank] = function(ThreadCommunicator(exchange, rank))
        except BaseException as error:
            errors[rank] = error
            exchange.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank-{r}") for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # the rank that failed first: the others only report the broken collective
    first = next((e for e in errors if e is not None and "never called it" not in str(e)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
