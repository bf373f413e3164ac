"""Every mpi4py call of lightning-mpi lives in this module.

The rest of the package talks to a :class:`Communicator`: the MPI one when the process was started by an MPI
launcher, or its single-process twin otherwise (so a plain ``python train.py`` never initialises MPI and
behaves like a single-device run). Nothing here knows about Lightning.

Tensors cross the wire as buffers: a contiguous CPU tensor is handed to MPI as a numpy view of its own
memory (no copy). Anything else (non-contiguous, 16-bit floats for reductions, CUDA without a CUDA-aware MPI)
is staged through a temporary host tensor and copied back.
"""

from __future__ import annotations

import atexit
import math
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor

ReduceOpName = Literal["sum", "mean", "min", "max"]

#: Environment variables set by the MPI launchers we know (Open MPI, MPICH/Hydra, Intel MPI, PMIx, srun --mpi).
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "PALS_RANKID")
# Where MPI launchers announce how many ranks they started (Open MPI; MPICH/Hydra, Intel MPI and srun --mpi=pmi2;
# Cray PALS). Slurm's PMIx server announces none: see _slurm_pmix_step_tasks.
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PALS_SIZE")
# The PMIx namespace Slurm gives the tasks of a step started by srun --mpi=pmix ("slurm.pmix.<job>.<step>").
_SLURM_PMIX_NAMESPACE = "slurm.pmix."
#: Seconds a rank waits between writing why it aborts and calling MPI_Abort, for the launcher to forward the text.
ABORT_GRACE = 0.5

# dtypes MPI can reduce directly through numpy; 16-bit floats are reduced in float32 (numpy has no bfloat16,
# and MPI implementations do not reliably reduce half precision).
_NUMPY_REDUCIBLE = {
    torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
}
# dtypes whose gathered layouts travel as integers (see MPICommunicator._allgather_layouts), up to this many dims
_LAYOUT_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128,
)
_LAYOUT_DIMS = 8
# For pure data movement (broadcast, gather) any dtype can travel as raw bits of the same width.
_BIT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.bool: torch.uint8}


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpirun, mpiexec, srun with an MPI plugin) started this process."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def _launcher_value(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launcher_rank() -> int:
    """This process's rank as the launcher announced it, read without initialising MPI (0 if none did)."""
    return _launcher_value(("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "PALS_RANKID"), 0)


def launcher_size() -> int:
    """The number of ranks the launcher started, read without initialising MPI (1 if none did).

    ``srun --mpi=pmix`` sets ``PMIX_RANK`` but no size variable: there the size is the step's task count.
    """
    return _launcher_value(_SIZE_VARIABLES, 0) or _slurm_pmix_step_tasks() or 1


def _slurm_pmix_step_tasks() -> int | None:
    if os.environ.get("PMIX_NAMESPACE", "").startswith(_SLURM_PMIX_NAMESPACE) and "SLURM_STEP_NUM_TASKS" in os.environ:
        return int(os.environ["SLURM_STEP_NUM_TASKS"])
    return None


def launcher_tasks() -> tuple[int, str] | None:
    """How many processes the launcher started together with this one, and the variable that says so.

    Unlike :func:`launcher_size`, this also counts a Slurm step started without MPI wiring (``srun -n 2`` where the
    site's default is ``--mpi=none``): each of its processes is an MPI world of one. ``None`` where nothing says:
    no launcher, the batch step of an ``sbatch`` script or an ``salloc`` shell (they set no step task count), or a
    PMIx launcher other than Slurm (it sets no size either).

    The MPI launchers' own variables come first: ``mpirun`` inside a Slurm allocation starts its daemons with
    ``srun``, one task per node, so its ranks also inherit that step's ``SLURM_STEP_NUM_TASKS``.
    """
    for name in _SIZE_VARIABLES:
        if name in os.environ:
            return int(os.environ[name]), name
    if "PMIX_RANK" in os.environ and _slurm_pmix_step_tasks() is None:
        return None
    if "SLURM_STEP_NUM_TASKS" in os.environ:
        return int(os.environ["SLURM_STEP_NUM_TASKS"]), "SLURM_STEP_NUM_TASKS"
    return None


def mpi_world_size() -> int:
    """The number of ranks in ``MPI_COMM_WORLD``; 1 while MPI is not initialised (this process is alone then).

    Never initialises MPI.
    """
    mod = sys.modules.get("mpi4py.MPI")
    if mod is None or not mod.Is_initialized() or mod.Is_finalized():
        return 1
    return mod.COMM_WORLD.Get_size()


def mpi_library() -> str | None:
    """The loaded MPI library in a few words, e.g. ``"Open MPI v5.0.11"`` or ``"MPICH Version: 4.3.0"`` (``None`` if
    mpi4py has not loaded one). Never initialises MPI."""
    mod = sys.modules.get("mpi4py.MPI")
    if mod is None:
        return None
    first = mod.Get_library_version().replace("\0", "").strip().split("\n")[0].split(",")[0]
    return " ".join(first.split()) or None


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

    #: What the rank is doing (e.g. ``"step 12"``); shown in stall reports. Assigning it costs nothing.
    context: str = ""

    def allreduce_(self, tensor: Tensor, op: ReduceOpName = "sum") -> Tensor:
        """Reduce ``tensor`` across ranks in place and return it. ``"mean"`` needs a floating-point tensor."""
        _check_op(tensor, op)
        return tensor

    def prepared_allreduce(self, tensor: Tensor, op: ReduceOpName = "sum") -> Reduction:
        """A reusable in-place :meth:`allreduce_` of ``tensor``, for a buffer reduced again and again (buckets).

        The buffer is described to MPI once, so each call costs what the MPI call itself costs. ``tensor`` must
        keep its memory (no resizing) while the returned :class:`Reduction` is in use.
        """
        _check_op(tensor, op)
        return Reduction(lambda: self.allreduce_(tensor, op))

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

    def all_ranks_failed(self, summary: str, patience: float = 10.0) -> bool:
        """Called by a rank that failed: whether every other rank failed too (then the failure can propagate on
        every rank as in one process). ``False`` as soon as some rank waits in a collective (it would wait for
        this rank forever), or when some rank neither fails nor enters a collective within ``patience`` seconds.
        Not a collective: it asks the other ranks what they are doing on a side channel."""
        return True


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


def _check_op(tensor: Tensor, op: str) -> None:
    if op not in ("sum", "mean", "min", "max"):
        raise ValueError(f"Unknown reduction {op!r}: use 'sum', 'mean', 'min' or 'max'.")
    if op == "mean" and not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(
            f"A 'mean' over ranks of a {tensor.dtype} tensor would truncate: convert it to a floating-point dtype "
            "first, or reduce with 'sum' and divide yourself."
        )


class MPICommunicator(Communicator):
    """:class:`Communicator` over an mpi4py communicator (a duplicate of ``COMM_WORLD`` by default).

    Args:
        comm: the mpi4py communicator to use; it is duplicated so our traffic never mixes with the user's.
        timeout: seconds a collective may take before the job is reported as stalled and aborted;
            ``None`` disables stall detection.
    """

    def __init__(self, comm: Any = None, timeout: float | None = 600.0) -> None:
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
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}
        self._bytes = 0
        self._same_calls_reason: str | None = None
        self._background: _Background | None = None
        self._monitor = _Monitor(self, validate_timeout(timeout)) if self.size > 1 else None

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
        _check_op(tensor, op)
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
        _check_op(tensor, op)
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
            return self._comm.allgather(obj)

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        if self.size == 1:
            return [obj]
        self._check_same_call("gather_object")
        with self._collective("gather_object"):
            return self._comm.gather(obj, root=root)

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
        mine = torch.tensor([codes[kind], dtype, tensor.numel() if tensor is not None else 0,
                             codes.get(op, -1)], dtype=torch.int64)
        everyone = torch.empty((self.size, 4), dtype=torch.int64)
        with self._collective("call check", mine):
            self._comm.Allgather(mine.numpy(), everyone.numpy())
        if bool((everyone == everyone[0]).all()):
            return
        calls = "; ".join(f"rank {r}: {_describe_call(row)}" for r, row in enumerate(everyone.tolist()))
        raise CollectiveMismatch(f"{reason}\nThe ranks called different collectives here: {calls}.")

    def all_ranks_failed(self, summary: str, patience: float = 10.0) -> bool:
        return self._monitor is None or self._monitor.all_ranks_failed(summary, patience)


_CALL_KINDS = ("allreduce", "broadcast", "broadcast_object", "allgather", "allgather_object", "gather_object",
               "barrier", "sum", "mean", "min", "max")


def _describe_call(row: list[int]) -> str:
    kind, dtype, numel, op = row
    text = _CALL_KINDS[kind]
    if dtype >= 0:
        text += f" of {numel} {_LAYOUT_DTYPES[dtype]}"
    return text + (f" ({_CALL_KINDS[op]})" if op >= 0 else "")


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
        except BaseException as error:  # noqa: BLE001 - handed to the thread that waits for it
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
        status = {"count": self._count, "failures": self._failures, "context": self._comm.context or "no step"}
        if op is None:
            return {**status, "op": None, "text": f"not in a collective ({status['context']}; last finished: "
                                                  f"#{self._count} {self._last})"}
        waited = time.monotonic() - self._since
        return {**status, "op": op, "text": f"waiting {waited:.0f} s in #{self._count} {self._describe(op)} "
                                            f"({status['context']})"}

    # -- the thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.wait(self._PERIOD):
            try:
                self._answer_queries()
                op, timeout = self._op, self.timeout
                if op is not None and timeout is not None and time.monotonic() - self._since > timeout:
                    self._report_stall_and_abort(op, timeout)
            except Exception as err:  # noqa: BLE001 - the monitor must never take the rank down on its own
                print(f"[lightning-mpi] rank {self._comm.rank}: monitor error {err!r}", file=sys.stderr, flush=True)

    def _answer_queries(self) -> None:
        # A matched probe: the message is ours alone even while another thread probes the same communicator.
        status = self._comm._MPI.Status()
        while (message := self._side.improbe(source=self._comm._MPI.ANY_SOURCE, tag=self._QUERY, status=status)):
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
        lines += [f"rank {r}: {replies[r]['text'] if r in replies else 'no answer (process busy outside MPI, or gone)'}"
                  for r in others]
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

    def all_ranks_failed(self, summary: str, patience: float) -> bool:
        self._failures += 1
        others = [r for r in range(self._comm.size) if r != self._comm.rank]
        waiting = list(others)
        deadline = time.monotonic() + patience
        while waiting and time.monotonic() < deadline:
            if self._told_every_rank_failed():
                return True
            replies = self._ask_everyone(self._FAILURE_REPLY, 0.5, waiting)
            for rank, status in replies.items():
                if status["failures"] >= self._failures:
                    waiting.remove(rank)  # failed too (and perhaps already handling it in collectives)
                elif status["op"] is not None:
                    return False  # waits in a collective for this rank, which will never come
        if waiting:
            return False
        # Tell the others, who may still be asking: a rank that knows may leave (and stop answering) right away.
        for r in others:
            self._side.send(self._failures, dest=r, tag=self._EVERY_RANK_FAILED)
        return True

    def _told_every_rank_failed(self) -> bool:
        status = self._comm._MPI.Status()
        told = False
        while (message := self._side.improbe(source=self._comm._MPI.ANY_SOURCE, tag=self._EVERY_RANK_FAILED,
                                             status=status)):
            told = told or message.recv() >= self._failures  # older verdicts are stale
        return told


_WORLD: Communicator | None = None


def world(timeout: float | None = 600.0) -> Communicator:
    """The communicator over all ranks of this job, created on first use (this initialises MPI if needed).

    Under an MPI launcher (or once mpi4py has initialised MPI) it is an :class:`MPICommunicator`;
    otherwise the single-process :class:`Communicator`, and MPI is never initialised.
    """
    global _WORLD
    if _WORLD is None:
        _WORLD = MPICommunicator(timeout=timeout) if launched_by_mpi() or _mpi_initialized() else Communicator()
    else:
        _WORLD.set_timeout(timeout)
    return _WORLD


def _mpi_initialized() -> bool:
    mod = sys.modules.get("mpi4py.MPI")
    return bool(mod is not None and mod.Is_initialized() and mod.COMM_WORLD.Get_size() > 1)


def abort_on_exception(comm: Communicator, exception: BaseException) -> None:
    """Print ``exception`` with this rank's number, then end every rank of the job."""
    tb = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
    # The process's own stderr: an excepthook may have redirected sys.stderr into a buffer it never gets to print.
    stream = sys.__stderr__ or sys.stderr
    print(f"[lightning-mpi] rank {comm.rank}/{comm.size} failed:\n{tb}", file=stream, flush=True)
    comm.abort(1)

