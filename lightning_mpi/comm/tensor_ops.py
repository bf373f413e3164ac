"""The tensor collectives torch.distributed needs beyond the strategy's own (reduce, gather, scatter, all-to-all,
reduce-scatter, point-to-point, sub-groups), as MPI calls: a part of :class:`~lightning_mpi.comm.MPICommunicator`.

Counts are in elements. Outputs are written in place; a tensor MPI cannot read or write directly (not contiguous,
a 16-bit float to reduce, device memory without a CUDA-aware MPI) travels through a host copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_mpi.comm.base import ReduceOpName, check_op

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from lightning_mpi.comm.mpi import MPICommunicator


class TensorCollectives:
    """Mixed into :class:`~lightning_mpi.comm.MPICommunicator`; every method is a collective over its ranks
    (send and receive excepted), under the stall monitor."""

    if TYPE_CHECKING:  # what the communicator it is mixed into provides
        rank: int
        size: int
        _MPI: Any
        _comm: Any
        _ops: dict[str, Any]
        _bytes: int
        _monitor: Any

        def _wire(self, tensor: Tensor, reducing: bool) -> tuple[Tensor, bool]: ...

        @staticmethod
        def _write_back(tensor: Tensor, wire: Tensor) -> None: ...

        def _collective(self, kind: str, tensor: Tensor | None = None) -> AbstractContextManager[None]: ...

    def reduce_(self, tensor: Tensor, op: ReduceOpName, root: int) -> Tensor:
        """Reduce ``tensor`` onto rank ``root`` in place (other ranks' tensors are left as they were)."""
        check_op(tensor, op)
        wire, staged = self._wire(tensor, reducing=True)
        MPI = self._MPI
        with self._collective(f"reduce(root={root})", tensor):
            if self.rank == root:
                self._comm.Reduce(MPI.IN_PLACE, _host(wire), op=self._ops[op], root=root)
            else:
                self._comm.Reduce(_host(wire), None, op=self._ops[op], root=root)
        self._bytes += wire.numel() * wire.element_size()
        if self.rank == root:
            if op == "mean":
                wire.div_(self.size)
            if staged:
                self._write_back(tensor, wire)
        return tensor

    def allgather_into_(self, out: Tensor, tensor: Tensor, counts: list[int]) -> Tensor:
        """Every rank's ``tensor`` (``counts[r]`` elements from rank ``r``) into ``out``, in rank order."""
        wire, _ = self._wire(tensor, reducing=False)
        into, staged = self._output(out)
        with self._collective("all_gather", tensor):
            self._comm.Allgatherv(_host(wire), [_host(into), counts])
        self._bytes += wire.numel() * wire.element_size()
        return self._deliver(out, into, staged)

    def gather_into_(self, out: Tensor | None, tensor: Tensor, counts: list[int], root: int) -> None:
        """Every rank's ``tensor`` into ``out`` on rank ``root`` (``out`` is ``None`` elsewhere)."""
        wire, _ = self._wire(tensor, reducing=False)
        with self._collective(f"gather(root={root})", tensor):
            if self.rank == root:
                assert out is not None
                into, staged = self._output(out)
                self._comm.Gatherv(_host(wire), [_host(into), counts], root=root)
                self._deliver(out, into, staged)
            else:
                self._comm.Gatherv(_host(wire), None, root=root)
        self._bytes += wire.numel() * wire.element_size()

    def scatter_from_(self, tensor: Tensor, source: Tensor | None, counts: list[int], root: int) -> None:
        """Rank ``r`` receives ``counts[r]`` elements of rank ``root``'s ``source`` into ``tensor``."""
        into, staged = self._output(tensor)
        with self._collective(f"scatter(root={root})", tensor):
            if self.rank == root:
                assert source is not None
                wire, _ = self._wire(source, reducing=False)
                self._comm.Scatterv([_host(wire), counts], _host(into), root=root)
                self._bytes += wire.numel() * wire.element_size()
            else:
                self._comm.Scatterv(None, _host(into), root=root)
        self._deliver(tensor, into, staged)

    def alltoallv_(self, out: Tensor, tensor: Tensor, out_counts: list[int], in_counts: list[int]) -> Tensor:
        """Rank ``r`` sends ``in_counts[s]`` consecutive elements of ``tensor`` to each rank ``s`` and receives
        ``out_counts[s]`` from each into ``out``."""
        wire, _ = self._wire(tensor, reducing=False)
        into, staged = self._output(out)
        with self._collective("all_to_all", tensor):
            self._comm.Alltoallv([_host(wire), in_counts], [_host(into), out_counts])
        self._bytes += wire.numel() * wire.element_size()
        return self._deliver(out, into, staged)

    def reduce_scatter_(self, out: Tensor, tensor: Tensor, counts: list[int], op: ReduceOpName) -> Tensor:
        """Reduce ``tensor`` over ranks and give rank ``r`` its ``counts[r]`` elements of the result in ``out``."""
        check_op(tensor, op)
        wire, _ = self._wire(tensor, reducing=True)
        into = torch.empty(counts[self.rank], dtype=wire.dtype)
        with self._collective("reduce_scatter", tensor):
            self._comm.Reduce_scatter(_host(wire), _host(into), counts, op=self._ops[op])
        self._bytes += wire.numel() * wire.element_size()
        if op == "mean":
            into.div_(self.size)
        self._write_back(out, into.view(out.shape) if out.numel() == into.numel() else into)
        return out

    def send(self, tensor: Tensor, dest: int, tag: int) -> Any:
        """Start sending ``tensor`` to rank ``dest``; returns the request and the buffer it reads (keep both)."""
        wire, _ = self._wire(tensor, reducing=False)
        self._bytes += wire.numel() * wire.element_size()
        return self._comm.Isend(_host(wire), dest=dest, tag=tag), wire

    def recv(self, tensor: Tensor, source: int | None, tag: int) -> Any:
        """Start receiving into ``tensor`` from ``source`` (``None``: any rank); ``finish_recv`` completes it."""
        into, staged = self._output(tensor)
        source = self._MPI.ANY_SOURCE if source is None else source
        return self._comm.Irecv(_host(into), source=source, tag=tag), (tensor, into, staged)

    def wait(self, request: Any, what: str, tensor: Tensor | None) -> int:
        """Wait for a started send or receive under the stall monitor; returns the peer's rank."""
        status = self._MPI.Status()
        with self._collective(what, tensor):
            request.Wait(status)
        return int(status.Get_source())

    def finish_recv(self, received: tuple[Tensor, Tensor, bool]) -> None:
        """After :meth:`wait` on a receive: its data where the caller's tensor is (if it was staged)."""
        tensor, into, staged = received
        self._deliver(tensor, into, staged)

    def subgroup(self, ranks: list[int], timeout: float | None) -> MPICommunicator:
        """A communicator over ``ranks`` (ranks of this one, in this order); only those ranks call it. Its calls are
        watched by this communicator's stall monitor (no thread of its own)."""
        # Creating it is collective (over its ranks): watched like any collective, so a rank that never comes is
        # reported instead of hanging the others.
        with self._collective(f"new process group of ranks {ranks}"):
            group = self._comm.Get_group().Incl(ranks)
            sub = self._comm.Create_group(group, tag=0)
            group.Free()
            try:
                from lightning_mpi.comm.mpi import MPICommunicator

                return MPICommunicator(sub, timeout=timeout, monitor=self._monitor)
            finally:
                sub.Free()

    # -- outputs ---------------------------------------------------------------------------------------

    def _output(self, out: Tensor) -> tuple[Tensor, bool]:
        """The buffer MPI writes into for ``out``, and whether it is a staging copy to deliver afterwards."""
        wire, staged = self._wire(out, reducing=False)
        return wire, staged

    def _deliver(self, out: Tensor, into: Tensor, staged: bool) -> Tensor:
        if staged:
            self._write_back(out, into.reshape(out.shape) if into.shape != out.shape else into)
        return out


def _host(tensor: Tensor) -> Any:
    """What mpi4py takes as a buffer: a flat numpy view of host memory, or the CUDA tensor itself."""
    return tensor.reshape(-1).numpy() if tensor.device.type == "cpu" else tensor
