"""The MPI communicator: collectives over an mpi4py communicator, staging where MPI cannot read a tensor."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from lightning_mpi.comm.base import (
    CollectiveMismatch,
    Communicator,
    ReduceOpName,
    Reduction,
    check_op,
    validate_timeout,
)
from lightning_mpi.comm.monitor import _Monitor
from lightning_mpi.comm.overlap import _Background, _MPIReduction
from lightning_mpi.comm.tensor_ops import TensorCollectives

ABORT_GRACE = 0.5

# dtypes MPI can reduce directly through numpy; 16-bit floats are reduced in float32 (numpy has no bfloat16,
# and MPI implementations do not reliably reduce half precision).
_NUMPY_REDUCIBLE = {
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
}
# Reductions that need nothing after MPI's (no division), for any dtype of _NUMPY_REDUCIBLE.
_IN_PLACE_OPS = frozenset(("sum", "min", "max", "product"))
# dtypes whose gathered layouts travel as integers (see MPICommunicator._allgather_layouts), up to this many dims
_LAYOUT_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_LAYOUT_DIMS = 8
# For pure data movement (broadcast, gather) any dtype can travel as raw bits of the same width.
_BIT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.bool: torch.uint8}


class MPICommunicator(TensorCollectives, Communicator):
    """:class:`Communicator` over an mpi4py communicator (a duplicate of ``COMM_WORLD`` by default).

    Args:
        comm: the mpi4py communicator to use; it is duplicated so our traffic never mixes with the user's.
        timeout: seconds a collective may take before the job is reported as stalled and aborted;
            ``None`` disables stall detection.
        monitor: the stall monitor of a parent communicator to report to (a subgroup's), instead of one of its own.
    """

    def __init__(self, comm: Any = None, timeout: float | None = 600.0, monitor: Any = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        base = MPI.COMM_WORLD if comm is None else comm
        self._comm = base.Dup()
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._local = self._node_communicator(MPI)
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()
        leaders = self._comm.allgather(self.local_rank == 0)
        leader_rank = self._local.bcast(self.rank, root=0)
        self.node_rank = sum(leaders[:leader_rank])
        self.num_nodes = sum(leaders)
        self.cuda_aware = _detect_cuda_aware()
        self.thread_multiple = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self._ops = {
            "sum": MPI.SUM,
            "mean": MPI.SUM,
            "min": MPI.MIN,
            "max": MPI.MAX,
            "product": MPI.PROD,
            "band": MPI.BAND,
            "bor": MPI.BOR,
            "bxor": MPI.BXOR,
        }
        self._bytes = 0
        self._same_calls_reason: str | None = None
        self._background: _Background | None = None
        # A sub-communicator (subgroup) reports to its parent's monitor: one watchdog thread per process.
        self._owns_monitor = monitor is None
        if monitor is None and self.size > 1:
            monitor = _Monitor(self, validate_timeout(timeout))
        self._monitor: _Monitor | None = monitor

    def free(self) -> None:
        """Release the MPI communicators (every rank of this one calls it; nothing may use it afterwards)."""
        if self._owns_monitor and self._monitor is not None:
            self._monitor.stop()
        self._background = None
        for handle in (self._local, self._comm):
            if handle != self._MPI.COMM_NULL:
                handle.Free()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        """The job's communicator pickles as a reference to itself (a Trainer, its callbacks and loggers pickle as
        under DDP); any other cannot be sent to another process."""
        from lightning_mpi import comm

        if comm._WORLD is not self:
            raise TypeError("An MPICommunicator other than the job's (lightning_mpi.comm.world()) cannot be pickled.")
        return comm.world, ()

    def _node_communicator(self, MPI: Any) -> Any:
        """The ranks on this rank's node: those that share memory with it, as MPI knows them. Where the launcher
        told MPI nothing about locality (Slurm's PMIx server and Open MPI 5: every rank alone in its group), the
        ranks with the same host name."""
        shared = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        hosts = self._comm.allgather((shared.Get_size(), MPI.Get_processor_name()))
        names = [name for _, name in hosts]
        if any(size > 1 for size, _ in hosts) or len(set(names)) == len(names):
            return shared
        shared.Free()
        return self._comm.Split(sorted(set(names)).index(names[self.rank]), key=self.rank)

    # -- buffers ---------------------------------------------------------------------------------------

    def _wire(self, tensor: Tensor, reducing: bool) -> tuple[Tensor, bool]:
        """The tensor MPI reads and writes, and whether it is a staging copy to write back.

        Contiguous tensors in memory MPI can read (host memory; device memory if the MPI is CUDA-aware) are
        used in place. 16-bit floats are reduced in float32; for pure data movement they travel as raw bits.
        """
        if reducing and tensor.dtype not in _NUMPY_REDUCIBLE:
            wire = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else torch.int64)
            return wire, True
        readable = tensor.device.type == "cpu" or (self.cuda_aware and tensor.device.type == "cuda")
        staged = not (readable and tensor.is_contiguous())
        wire = tensor.detach().to("cpu").contiguous() if staged else tensor.detach()
        return (wire.view(_BIT_VIEWS[wire.dtype]) if wire.dtype in _BIT_VIEWS else wire), staged

    @staticmethod
    def _write_back(tensor: Tensor, wire: Tensor) -> None:
        if tensor.dtype in _BIT_VIEWS and wire.dtype == _BIT_VIEWS[tensor.dtype]:
            wire = wire.view(tensor.dtype)
        with torch.no_grad():
            tensor.copy_(wire)

    @contextmanager
    def _collective(self, kind: str, tensor: Tensor | None = None) -> Iterator[None]:
        # The description is formatted only if a report is printed: the normal path stores two references.
        if self._monitor is None:
            yield
            return
        self._monitor.enter(kind, tensor)
        try:
            yield
        finally:
            self._monitor.exit()

    # -- collectives -----------------------------------------------------------------------------------

    def allreduce_(self, tensor: Tensor, op: ReduceOpName = "sum") -> Tensor:
        if (
            op in _IN_PLACE_OPS
            and self._same_calls_reason is None
            and tensor.dtype in _NUMPY_REDUCIBLE
            and tensor.device.type == "cpu"
            and tensor.is_contiguous()
            and self.size > 1
        ):
            # The common case, kept lean (torch.distributed's all_reduce comes through here): MPI reads and writes
            # the tensor's own memory.
            self._watched_allreduce(tensor.detach().numpy(), self._ops[op], tensor)
            self._bytes += tensor.numel() * tensor.element_size()
            return tensor
        check_op(tensor, op)
        if self.size == 1:
            return tensor
        self._check_same_call("allreduce", tensor, op)
        wire, staged = self._wire(tensor, reducing=True)
        if tensor.device.type == "cuda":
            torch.cuda.current_stream(tensor.device).synchronize()
        self._watched_allreduce(_buffer(wire), self._ops[op], tensor)
        self._bytes += wire.numel() * wire.element_size()
        if staged:
            self._write_back(tensor, wire)
        if op == "mean":
            with torch.no_grad():
                tensor.div_(self.size)
        return tensor

    def prepared_allreduce(self, tensor: Tensor, op: ReduceOpName = "sum") -> Reduction:
        check_op(tensor, op)
        direct = tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _NUMPY_REDUCIBLE
        if self.size == 1 or op == "mean" or not direct:
            return super().prepared_allreduce(tensor, op)  # staged, on a device, or divided: the general path
        return _MPIReduction(self, tensor, self._ops[op], op)

    def enable_background(self) -> bool:
        if self.size == 1 or self._MPI.Query_thread() < self._MPI.THREAD_MULTIPLE:
            return False
        if self._background is None:
            self._background = _Background(self._comm.Dup())
        return True

    @property
    def checks_calls(self) -> bool:
        return self._same_calls_reason is not None

    def _watched_allreduce(self, buffer: Any, mpi_op: Any, tensor: Tensor, comm: Any = None) -> None:
        """In-place ``Allreduce`` of ``buffer`` under the monitor (the hot path: no context manager)."""
        monitor = self._monitor
        if monitor is not None:
            monitor.enter("allreduce", tensor)
        try:
            (comm or self._comm).Allreduce(self._MPI.IN_PLACE, buffer, op=mpi_op)
        finally:
            if monitor is not None:
                monitor.exit()

    def broadcast_(self, tensor: Tensor, root: int = 0) -> Tensor:
        if self.size == 1:
            return tensor
        self._check_same_call("broadcast", tensor)
        wire, staged = self._wire(tensor, reducing=False)
        with self._collective(f"broadcast(root={root})", tensor):
            self._comm.Bcast(_buffer(wire), root=root)
        self._bytes += wire.numel() * wire.element_size()
        if staged:
            self._write_back(tensor, wire)
        return tensor

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if self.size == 1:
            return obj
        self._check_same_call("broadcast_object")
        with self._collective("broadcast_object"):
            return self._comm.bcast(obj, root=root)

    def allgather(self, tensor: Tensor) -> list[Tensor]:
        if self.size == 1:
            return [tensor.clone()]
        self._check_same_call("allgather", None)  # shapes may differ between ranks: the kind must not
        shapes, dtype = _gather_layout(self._allgather_layouts(tensor))
        tensor = tensor.to(dtype).reshape(shapes[self.rank])
        wire, _ = self._wire(tensor, reducing=False)
        counts = [_numel(shape) for shape in shapes]
        out = torch.empty(sum(counts), dtype=wire.dtype, device=wire.device)
        with self._collective("allgather", tensor):
            self._comm.Allgatherv(_buffer(wire.reshape(-1)), [_buffer(out), counts])
        self._bytes += wire.numel() * wire.element_size()  # this rank's part (DiLoCo's half-precision changes)
        if dtype in _BIT_VIEWS:
            out = out.view(dtype)
        return [part.reshape(shape).to(tensor.device) for part, shape in zip(torch.split(out, counts), shapes)]

    def _allgather_layouts(self, tensor: Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Every rank's (shape, dtype), as fixed-size integers: no pickling (metric syncs and ensemble outputs
        gather small tensors often). Any rank with more dimensions or an unlisted dtype sends the flag -1, and
        then every rank exchanges the layouts as objects."""
        code = _LAYOUT_DTYPES.index(tensor.dtype) if tensor.dtype in _LAYOUT_DTYPES else -1
        fits = code >= 0 and tensor.dim() <= _LAYOUT_DIMS
        local = torch.full((_LAYOUT_DIMS + 2,), -1, dtype=torch.int64)
        if fits:
            local[0], local[1] = tensor.dim(), code
            local[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        layouts = torch.empty((self.size, _LAYOUT_DIMS + 2), dtype=torch.int64)
        with self._collective("allgather(layout)", tensor):
            self._comm.Allgather(local.numpy(), layouts.numpy())
        self._bytes += local.numel() * local.element_size()
        if bool((layouts[:, 0] < 0).any()):
            return self.allgather_object((tuple(tensor.shape), tensor.dtype))
        return [(tuple(row[2 : 2 + row[0]]), _LAYOUT_DTYPES[row[1]]) for row in layouts.tolist()]

    def allgather_object(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        self._check_same_call("allgather_object")
        with self._collective("allgather_object"):
            return list(self._comm.allgather(obj))

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        if self.size == 1:
            return [obj]
        self._check_same_call("gather_object")
        with self._collective("gather_object"):
            gathered = self._comm.gather(obj, root=root)
        return list(gathered) if gathered is not None else None

    def barrier(self) -> None:
        if self.size == 1:
            return
        self._check_same_call("barrier")
        with self._collective("barrier"):
            self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # What this rank just wrote still sits in the pipe to the launcher's proxy; an abort that reaches the
        # launcher first tears the job down with the report unread (MPICH's Hydra loses it under load).
        time.sleep(ABORT_GRACE)
        self._MPI.COMM_WORLD.Abort(code)

    def bytes_sent(self) -> int:
        return self._bytes

    def set_timeout(self, timeout: float | None) -> None:
        if self._monitor is not None:
            self._monitor.timeout = validate_timeout(timeout)

    def require_same_calls(self, reason: str | None) -> None:
        self._same_calls_reason = reason

    def _check_same_call(self, kind: str, tensor: Tensor | None = None, op: str = "") -> None:
        reason = self._same_calls_reason
        if reason is None:
            return
        codes = {name: i for i, name in enumerate(_CALL_KINDS)}
        dtype = _LAYOUT_DTYPES.index(tensor.dtype) if tensor is not None and tensor.dtype in _LAYOUT_DTYPES else -1
        mine = torch.tensor(
            [codes[kind], dtype, tensor.numel() if tensor is not None else 0, codes.get(op, -1)], dtype=torch.int64
        )
        everyone = torch.empty((self.size, 4), dtype=torch.int64)
        with self._collective("call check", mine):
            self._comm.Allgather(mine.numpy(), everyone.numpy())
        if bool((everyone == everyone[0]).all()):
            return
        calls = "; ".join(f"rank {r}: {_describe_call(row)}" for r, row in enumerate(everyone.tolist()))
        raise CollectiveMismatch(f"{reason}\nThe ranks called different collectives here: {calls}.")

    def all_ranks_failed(self, summary: str, patience: float = 10.0) -> dict[int, str] | None:
        if self._monitor is None:
            return {self.rank: summary}
        return self._monitor.all_ranks_failed(summary, patience)


_CALL_KINDS = (
    "allreduce",
    "broadcast",
    "broadcast_object",
    "allgather",
    "allgather_object",
    "gather_object",
    "barrier",
    "sum",
    "mean",
    "min",
    "max",
)


def _describe_call(row: list[int]) -> str:
    kind, dtype, numel, op = row
    text = _CALL_KINDS[kind]
    if dtype >= 0:
        text += f" of {numel} {_LAYOUT_DTYPES[dtype]}"
    return text + (f" ({_CALL_KINDS[op]})" if op >= 0 else "")


def _buffer(tensor: Tensor) -> Any:
    """What mpi4py takes as a buffer: a numpy view of host memory, or the CUDA tensor itself (CUDA-aware MPI)."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gather_layout(
    layouts: list[tuple[tuple[int, ...], torch.dtype]],
) -> tuple[list[tuple[int, ...]], torch.dtype]:
    """Shapes to gather and the common dtype; empty tensors take the layout of the first non-empty one."""
    filled = [(shape, dtype) for shape, dtype in layouts if _numel(shape) > 0]
    if not filled:
        return [shape for shape, _ in layouts], layouts[0][1]
    template, dtype = filled[0]
    for shape, other in filled:
        if other != dtype or len(shape) != len(template) or shape[1:] != template[1:]:
            listing = ", ".join(f"rank {r}: {tuple(s)} {d}" for r, (s, d) in enumerate(layouts))
            raise ValueError(
                "all_gather needs the same dtype and the same trailing dimensions on every rank (only the first "
                f"dimension may differ); got {listing}."
            )
    empty = (0, *template[1:]) if template else (0,)
    return [shape if _numel(shape) > 0 else empty for shape, _ in layouts], dtype


@lru_cache(1)
def _detect_cuda_aware() -> bool:
    """Whether the loaded MPI library can read CUDA device memory (``LIGHTNING_MPI_CUDA_AWARE=0/1`` decides)."""
    forced = os.environ.get("LIGHTNING_MPI_CUDA_AWARE")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    if not torch.cuda.is_available():
        return False
    try:
        import ctypes

        with open("/proc/self/maps") as handle:
            maps = handle.read()
        for path in sorted(set(re.findall(r"(\S*libmpi\S*\.so\S*)", maps))):
            query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
            if query is not None:
                return bool(query())
    except OSError:
        pass
    return False
