"""The Communicator protocol and its single-process twin, and the small types every communicator shares."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

#: Reductions over ranks; "mean" divides the sum by the number of ranks, the bitwise ones need integers or bool.
ReduceOpName = Literal["sum", "mean", "min", "max", "product", "band", "bor", "bxor"]


class Communicator:
    """Collective operations over a group of ranks; this base class is the single-process twin.

    Every method is a collective: all ranks must call it, in the same order. Tensors are modified in place
    where the name ends with an underscore.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    cuda_aware: bool = False
    #: whether MPI serves calls from several threads at once (``MPI_THREAD_MULTIPLE``)
    thread_multiple: bool = False

    #: What the rank is doing (e.g. ``"step 12"``); shown in stall reports. Assigning it costs nothing.
    context: str = ""

    def allreduce_(self, tensor: Tensor, op: ReduceOpName = "sum") -> Tensor:
        """Reduce ``tensor`` across ranks in place and return it. ``"mean"`` needs a floating-point tensor."""
        check_op(tensor, op)
        return tensor

    def prepared_allreduce(self, tensor: Tensor, op: ReduceOpName = "sum") -> Reduction:
        """A reusable in-place :meth:`allreduce_` of ``tensor``, for a buffer reduced again and again (buckets).

        The buffer is described to MPI once, so each call costs what the MPI call itself costs. ``tensor`` must
        keep its memory (no resizing) while the returned :class:`Reduction` is in use.
        """
        check_op(tensor, op)
        return Reduction(functools.partial(self.allreduce_, tensor, op))

    def enable_background(self) -> bool:
        """Prepare a thread that runs reductions while the caller computes (:meth:`Reduction.start`); a collective.
        Returns whether reductions really overlap (not in one process, nor where MPI cannot serve two threads)."""
        return False

    @property
    def checks_calls(self) -> bool:
        """Whether collectives are being checked for the same call on every rank (:meth:`require_same_calls`)."""
        return False

    def broadcast_(self, tensor: Tensor, root: int = 0) -> Tensor:
        """Overwrite ``tensor`` on every rank with the values of rank ``root``."""
        return tensor

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Return rank ``root``'s picklable ``obj`` on every rank."""
        return obj

    def allgather(self, tensor: Tensor) -> list[Tensor]:
        """Return every rank's tensor, in rank order. First dimensions may differ between ranks."""
        return [tensor.clone()]

    def allgather_object(self, obj: Any) -> list[Any]:
        """Return every rank's picklable ``obj``, in rank order."""
        return [obj]

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Return every rank's picklable ``obj`` on rank ``root`` (in rank order), ``None`` elsewhere."""
        return [obj]

    # -- what torch.distributed needs besides (see lightning_mpi.comm.tensor_ops); here: one rank -----

    def reduce_(self, tensor: Tensor, op: ReduceOpName, root: int) -> Tensor:
        """Reduce ``tensor`` onto rank ``root`` in place."""
        check_op(tensor, op)
        return tensor

    def allgather_into_(self, out: Tensor, tensor: Tensor, counts: list[int]) -> Tensor:
        """Every rank's ``tensor`` (``counts[r]`` elements from rank ``r``) into ``out``, in rank order."""
        return _copy_flat(out, tensor)

    def gather_into_(self, out: Tensor | None, tensor: Tensor, counts: list[int], root: int) -> None:
        """Every rank's ``tensor`` into ``out`` on rank ``root`` (``None`` elsewhere)."""
        if out is not None:
            _copy_flat(out, tensor)

    def scatter_from_(self, tensor: Tensor, source: Tensor | None, counts: list[int], root: int) -> None:
        """Rank ``r`` receives ``counts[r]`` elements of rank ``root``'s ``source`` into ``tensor``."""
        assert source is not None
        _copy_flat(tensor, source)

    def alltoallv_(self, out: Tensor, tensor: Tensor, out_counts: list[int], in_counts: list[int]) -> Tensor:
        """Each rank sends ``in_counts[s]`` elements to rank ``s`` and receives ``out_counts[s]`` from it."""
        return _copy_flat(out, tensor)

    def reduce_scatter_(self, out: Tensor, tensor: Tensor, counts: list[int], op: ReduceOpName) -> Tensor:
        """Reduce ``tensor`` over ranks; rank ``r`` gets its ``counts[r]`` elements of the result in ``out``."""
        check_op(tensor, op)
        return _copy_flat(out, tensor)

    def send(self, tensor: Tensor, dest: int, tag: int) -> Any:
        """Start sending ``tensor`` to rank ``dest``."""
        raise ValueError(f"send to rank {dest}: this job has a single rank.")

    def recv(self, tensor: Tensor, source: int | None, tag: int) -> Any:
        """Start receiving into ``tensor`` from rank ``source`` (``None``: any)."""
        raise ValueError(f"recv from rank {source}: this job has a single rank.")

    def wait(self, request: Any, what: str, tensor: Tensor | None) -> int:
        """Wait for a started send or receive; the peer's rank."""
        raise ValueError(f"{what}: this job has a single rank.")

    def finish_recv(self, received: Any) -> None:
        """After :meth:`wait` on a receive: its data where the caller's tensor is."""
        raise ValueError("recv: this job has a single rank.")

    def subgroup(self, ranks: list[int], timeout: float | None) -> Communicator:
        """A communicator over ``ranks`` of this one; only those ranks call it."""
        return self

    def free(self) -> None:
        """Release what the communicator holds (a subgroup's MPI communicators); a collective over its ranks."""

    def barrier(self) -> None:
        """Block until every rank has arrived."""

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now."""
        os._exit(code)

    def bytes_sent(self) -> int:
        """Payload bytes this rank contributed to reductions, broadcasts and tensor gathers so far."""
        return 0

    def set_timeout(self, timeout: float | None) -> None:
        """Seconds a collective may take before the job is reported as stalled and aborted (``None``: no limit)."""

    def require_same_calls(self, reason: str | None) -> None:
        """While ``reason`` is set, every collective first checks that all ranks call the same one (same kind,
        dtype, size and operation) and raises :class:`CollectiveMismatch` with ``reason`` on every rank if not.
        For stretches where ranks may run different code paths (uneven inputs); costs one small exchange each."""

    def all_ranks_failed(self, summary: str, patience: float = 10.0) -> dict[int, str] | None:
        """Called by a rank that failed, ``summary`` saying how: if every other rank failed too (then the failure
        can propagate on every rank as in one process), the ranks' summaries by rank (this rank's at least, the
        others' where they told it); ``None`` as soon as some rank waits in a collective (it would wait for this
        rank forever), or when some rank neither fails nor enters a collective within ``patience`` seconds.
        Not a collective: it asks the other ranks what they are doing on a side channel."""
        return {self.rank: summary}


class CollectiveMismatch(RuntimeError):
    """Ranks called different collectives at the same point (see :meth:`Communicator.require_same_calls`)."""


_OP_NAMES = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def reduce_op_name(reduce_op: Any) -> ReduceOpName:
    """The reduction named by a string (``"mean"``, ``"avg"``, ``"sum"``, ...) or by ``torch.distributed.ReduceOp``
    (what Lightning passes); ``None`` means ``"mean"``.

    >>> reduce_op_name("AVG"), reduce_op_name(None)
    ('mean', 'mean')
    """
    if reduce_op is None:
        return "mean"
    key = reduce_op.lower() if isinstance(reduce_op, str) else _torch_op_name(reduce_op)
    if key not in _OP_NAMES:
        raise ValueError(f"reduce_op={reduce_op!r} is not supported over MPI: use mean, sum, max or min.")
    return _OP_NAMES[key]  # type: ignore[return-value]


def _torch_op_name(reduce_op: Any) -> str:
    if not torch.distributed.is_available():
        return ""
    ops = torch.distributed.ReduceOp
    return {ops.SUM: "sum", ops.MAX: "max", ops.MIN: "min", ops.AVG: "mean"}.get(reduce_op, "")


def validate_timeout(timeout: float | None) -> float | None:
    """``timeout`` as a number of seconds, or ``None`` for no stall detection (also for ``0``).

    >>> validate_timeout(0) is None, validate_timeout(5)
    (True, 5.0)
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise ValueError(
            f"timeout={timeout!r} is not valid: give the seconds a collective may take before the job is reported "
            "as stalled and aborted (a positive number), or None or 0 for no stall detection."
        )
    return float(timeout) if timeout > 0 else None


class Reduction:
    """A prepared in-place reduction of one buffer (a gradient bucket), reused step after step.

    Call it (or :meth:`run`) to reduce now; or :meth:`start` it, compute meanwhile, and :meth:`wait` for it. Here
    (one process, or no background thread) starting runs it at once.
    """

    def __init__(self, run: Callable[[], Tensor]) -> None:
        self._run = run

    def __call__(self) -> Tensor:
        return self._run()

    def run(self) -> Tensor:
        return self._run()

    def start(self) -> None:
        self._run()

    def wait(self) -> None:
        """Return once the started reduction is complete (re-raising what it raised)."""


class TrafficMeter:
    """Payload bytes a rank sent in collectives during each training epoch."""

    def __init__(self) -> None:
        #: bytes per finished epoch, in order
        self.per_epoch: list[int] = []
        self._start: int | None = None

    def start_epoch(self, comm: Communicator) -> None:
        self.end_epoch(comm)
        self._start = comm.bytes_sent()

    def end_epoch(self, comm: Communicator) -> None:
        if self._start is not None:
            self.per_epoch.append(comm.bytes_sent() - self._start)
            self._start = None


_BITWISE = ("band", "bor", "bxor")


def check_op(tensor: Tensor, op: str) -> None:
    """Raise a clear error unless ``op`` can reduce ``tensor`` over ranks."""
    if op not in ("sum", "mean", "min", "max", "product", *_BITWISE):
        raise ValueError(
            f"Unknown reduction {op!r}: use 'sum', 'mean', 'min', 'max', 'product', 'band', 'bor' or 'bxor'."
        )
    if op in _BITWISE and (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"The bitwise reduction {op!r} needs an integer or bool tensor, not {tensor.dtype}.")
    if op == "mean" and not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(
            f"A 'mean' over ranks of a {tensor.dtype} tensor would truncate: convert it to a floating-point dtype "
            "first, or reduce with 'sum' and divide yourself."
        )


def _copy_flat(out: Tensor, tensor: Tensor) -> Tensor:
    with torch.no_grad():
        out.view(-1)[: tensor.numel()].copy_(tensor.reshape(-1))
    return out
