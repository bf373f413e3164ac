"""The ``"mpi4py"`` torch.distributed backend: a Python process group whose collectives are MPI calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future
from typing_extensions import override

from lightning_mpi.comm import Communicator, ReduceOpName
from lightning_mpi.distributed.executor import OrderedExecutor

BACKEND = "mpi4py"

_REDUCTIONS: dict[str, ReduceOpName] = {
    "SUM": "sum",
    "AVG": "mean",
    "PRODUCT": "product",
    "MIN": "min",
    "MAX": "max",
    "BAND": "band",
    "BOR": "bor",
    "BXOR": "bxor",
}


_REDUCTIONS_BY_TYPE = {getattr(dist.ReduceOp.RedOpType, name): op for name, op in _REDUCTIONS.items()}


class MPIProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group over an MPI communicator of its own (a duplicate: its traffic never
    mixes with the strategy's or the user's).

    Collectives run in issue order (an ``OrderedExecutor``);
    ``async_op=True`` returns work that completes on the group's thread while the caller goes on. Every call is
    watched by the communicator's stall monitor (the group's ``timeout``).
    """

    def __init__(self, comm: Communicator, threaded: bool) -> None:
        super().__init__(comm.rank, comm.size)
        self.comm = comm
        self._executor = OrderedExecutor(threaded and comm.size > 1)
        self._name = ""
        self._description = ""
        done: Future[Any] = Future()
        done.set_result(None)
        self._completed = _create_work_from_future(done)

    @override
    def getBackendName(self) -> str:
        return BACKEND

    # torch names every group; a Python group keeps the names itself (the C++ base keeps them in its backends, and
    # this group has none): functional collectives and DeviceMesh find groups by name.
    @override
    def setGroupName(self, name: str) -> None:
        self._name = name

    @override
    def getGroupName(self) -> str:
        return self._name

    @override
    def setGroupDesc(self, description: str) -> None:
        self._description = description

    @override
    def getGroupDesc(self) -> str:
        return self._description

    def __repr__(self) -> str:
        return f"MPIProcessGroup(rank={self.comm.rank}, size={self.comm.size})"

    # -- running -----------------------------------------------------------------------------------------

    def _run(self, job: Callable[[], Any], opts: Any, result: Any) -> dist.Work:
        """Run ``job`` in issue order and return work whose future holds ``result`` (what torch expects). A
        synchronous call with nothing pending runs at once and returns the group's completed work (no future made:
        torch only waits on it)."""
        asynchronous = bool(getattr(opts, "asyncOp", True))
        if not asynchronous and self._executor.run_if_idle(job):
            return self._completed

        def complete() -> Any:
            job()
            return result

        return _create_work_from_future(self._executor.submit(complete, asynchronous))

    def _reduction(self, opts: Any) -> ReduceOpName:
        op = opts.reduceOp.op
        name = _REDUCTIONS_BY_TYPE.get(op)
        if name is None:
            raise ValueError(
                f"ReduceOp.{op.name} is not supported by the mpi4py backend: use SUM, AVG, PRODUCT, MIN, MAX, BAND, "
                "BOR or BXOR (multiply by the factor yourself instead of PREMUL_SUM)."
            )
        return name

    # -- reductions --------------------------------------------------------------------------------------

    @override
    def allreduce(self, tensors: list[Tensor], opts: Any = None) -> dist.Work:
        opts = opts or dist.AllreduceOptions()
        op = self._reduction(opts)

        def job() -> None:
            for t in tensors:
                if op == "mean" and not (t.is_floating_point() or t.is_complex()):
                    # AVG of integers: the sum divided with truncation, as NCCL does (and Lightning over gloo)
                    self.comm.allreduce_(t, "sum")
                    t.copy_(torch.div(t, self.comm.size, rounding_mode="trunc"))
                else:
                    self.comm.allreduce_(t, op)

        return self._run(job, opts, tensors)

    @override
    def allreduce_coalesced(self, tensors: list[Tensor], opts: Any = None) -> dist.Work:
        return self.allreduce(tensors, opts or dist.AllreduceCoalescedOptions())

    @override
    def reduce(self, tensors: list[Tensor], opts: Any = None) -> dist.Work:
        opts = opts or dist.ReduceOptions()
        op, root = self._reduction(opts), opts.rootRank
        return self._run(lambda: [self.comm.reduce_(t, op, root) for t in tensors], opts, tensors)

    @override
    def reduce_scatter(self, outputs: list[Tensor], inputs: list[list[Tensor]], opts: Any = None) -> dist.Work:
        opts = opts or dist.ReduceScatterOptions()
        op = self._reduction(opts)

        def job() -> None:
            for out, parts in zip(outputs, inputs):
                _check_count("reduce_scatter", "input_list", parts, self.comm.size)
                flat = torch.cat([p.reshape(-1) for p in parts])
                self.comm.reduce_scatter_(out, flat, [p.numel() for p in parts], op)

        return self._run(job, opts, outputs)

    def reduce_scatter_single(self, output: Tensor, input: Tensor, opts: Any = None) -> dist.Work:
        opts = opts or dist.ReduceScatterOptions()
        op = self._reduction(opts)
        _check_divisible("reduce_scatter_single", input, output, self.comm.size)
        return self._run(
            lambda: self.comm.reduce_scatter_(output, input, [output.numel()] * self.comm.size, op), opts, output
        )

    _reduce_scatter_base = reduce_scatter_single

    @override
    def reduce_scatter_single_coalesced(
        self, outputs: list[Tensor], inputs: list[Tensor], opts: Any = None
    ) -> dist.Work:
        opts = opts or dist.ReduceScatterOptions()
        op = self._reduction(opts)

        def job() -> None:
            for out, flat in zip(outputs, inputs):
                self.comm.reduce_scatter_(out, flat, [out.numel()] * self.comm.size, op)

        return self._run(job, opts, outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # -- data movement -----------------------------------------------------------------------------------

    @override
    def broadcast(self, tensors: list[Tensor], opts: Any = None) -> dist.Work:
        opts = opts or dist.BroadcastOptions()
        root = opts.rootRank
        return self._run(lambda: [self.comm.broadcast_(t, root) for t in tensors], opts, tensors)

    @override
    def allgather(self, outputs: list[list[Tensor]], inputs: list[Tensor], opts: Any = None) -> dist.Work:
        opts = opts or dist.AllgatherOptions()

        def job() -> None:
            for outs, tensor in zip(outputs, inputs):
                _check_count("all_gather", "tensor_list", outs, self.comm.size)
                flat = torch.empty(sum(o.numel() for o in outs), dtype=tensor.dtype, device=tensor.device)
                self.comm.allgather_into_(flat, _matching(tensor, outs[self.comm.rank]), [o.numel() for o in outs])
                _split_into(flat, outs)

        return self._run(job, opts, outputs)

    def allgather_coalesced(self, outputs: list[list[Tensor]], inputs: list[Tensor], opts: Any = None) -> dist.Work:
        """``outputs[r][j]``: input ``j`` of rank ``r`` (rank first, unlike :meth:`allgather`)."""
        return self.allgather([[per_rank[j] for per_rank in outputs] for j in range(len(inputs))], inputs, opts)

    def all_gather_single(self, output: Tensor, input: Tensor, opts: Any = None) -> dist.Work:
        opts = opts or dist.AllgatherOptions()
        _check_divisible("all_gather_single", output, input, self.comm.size)
        return self._run(
            lambda: self.comm.allgather_into_(output, input, [input.numel()] * self.comm.size), opts, output
        )

    _allgather_base = all_gather_single

    @override
    def all_gather_single_coalesced(self, outputs: list[Tensor], inputs: list[Tensor], opts: Any = None) -> dist.Work:
        opts = opts or dist.AllgatherOptions()

        def job() -> None:
            for out, tensor in zip(outputs, inputs):
                self.comm.allgather_into_(out, tensor, [tensor.numel()] * self.comm.size)

        return self._run(job, opts, outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def gather(self, outputs: list[list[Tensor]], inputs: list[Tensor], opts: Any = None) -> dist.Work:
        opts = opts or dist.GatherOptions()
        root, here = opts.rootRank, self.comm.rank == opts.rootRank

        def job() -> None:
            tensor = inputs[0]
            if here:
                outs = outputs[0]
                _check_count("gather", "gather_list", outs, self.comm.size)
                flat = torch.empty(sum(o.numel() for o in outs), dtype=tensor.dtype, device=tensor.device)
                self.comm.gather_into_(flat, _matching(tensor, outs[root]), [o.numel() for o in outs], root)
                _split_into(flat, outs)
            else:
                self.comm.gather_into_(None, tensor, [], root)

        return self._run(job, opts, outputs)

    def scatter(self, outputs: list[Tensor], inputs: list[list[Tensor]], opts: Any = None) -> dist.Work:
        opts = opts or dist.ScatterOptions()
        root, here = opts.rootRank, self.comm.rank == opts.rootRank

        def job() -> None:
            out = outputs[0]
            if here:
                parts = inputs[0]
                _check_count("scatter", "scatter_list", parts, self.comm.size)
                flat = torch.cat([p.reshape(-1) for p in parts])
                self.comm.scatter_from_(out, flat, [p.numel() for p in parts], root)
            else:
                self.comm.scatter_from_(out, None, [], root)

        return self._run(job, opts, outputs)

    def alltoall(self, outputs: list[Tensor], inputs: list[Tensor], opts: Any = None) -> dist.Work:
        opts = opts or dist.AllToAllOptions()

        def job() -> None:
            _check_count("all_to_all", "input_tensor_list", inputs, self.comm.size)
            _check_count("all_to_all", "output_tensor_list", outputs, self.comm.size)
            flat_in = torch.cat([t.reshape(-1) for t in inputs])
            flat_out = torch.empty(sum(t.numel() for t in outputs), dtype=flat_in.dtype, device=flat_in.device)
            self.comm.alltoallv_(flat_out, flat_in, [t.numel() for t in outputs], [t.numel() for t in inputs])
            _split_into(flat_out, outputs)

        return self._run(job, opts, outputs)

    @override
    def all_to_all_single(
        self,
        output: Tensor,
        input: Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> dist.Work:
        opts = opts or dist.AllToAllOptions()
        size = self.comm.size
        out_counts = _counts(output, output_split_sizes, size, "output_split_sizes")
        in_counts = _counts(input, input_split_sizes, size, "input_split_sizes")
        return self._run(lambda: self.comm.alltoallv_(output, input, out_counts, in_counts), opts, output)

    alltoall_base = all_to_all_single

    @override
    def barrier(self, opts: Any = None) -> dist.Work:
        return self._run(self.comm.barrier, opts or dist.BarrierOptions(), None)

    # -- point to point ----------------------------------------------------------------------------------

    @override
    def send(self, tensors: list[Tensor], dst: int, tag: int) -> dist.Work:
        request, wire = self.comm.send(tensors[0], dst, tag)  # started now: a matching receive may come first
        return _P2PWork(lambda: self.comm.wait(request, f"send(to={dst}, tag={tag})", wire), tensors)

    @override
    def recv(self, tensors: list[Tensor], src: int, tag: int) -> dist.Work:
        return self._receive(tensors, src, tag)

    def recv_anysource(self, tensors: list[Tensor], tag: int) -> dist.Work:
        return self._receive(tensors, None, tag)

    def _receive(self, tensors: list[Tensor], src: int | None, tag: int) -> dist.Work:
        request, received = self.comm.recv(tensors[0], src, tag)

        def finish() -> int:
            source = self.comm.wait(request, f"recv(from={'any' if src is None else src}, tag={tag})", tensors[0])
            self.comm.finish_recv(received)
            return source

        return _P2PWork(finish, tensors)

    # -- sub-groups --------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """``destroy_process_group``: finish queued work, then release the group's MPI communicator."""
        self._executor.stop()
        self.comm.free()


class _P2PWork(dist.Work):
    """A started send or receive: :meth:`wait` completes it (the peer may have matched it long before)."""

    def __init__(self, finish: Callable[[], int], tensors: list[Tensor]) -> None:
        super().__init__()
        self._finish = finish
        self._tensors = tensors
        self._source: int | None = None
        self._future: Future[Any] = Future()

    def wait(self, timeout: Any = None) -> bool:
        if self._source is None:
            self._source = self._finish()
            self._future.set_result(self._tensors)
        return True

    def is_completed(self) -> bool:
        return self._source is not None

    def _source_rank(self) -> int:
        self.wait()
        assert self._source is not None
        return self._source

    def get_future(self) -> Future[Any]:
        return self._future


def _check_count(call: str, name: str, tensors: Sequence[Tensor], size: int) -> None:
    if len(tensors) != size:
        raise ValueError(f"{call}: {name} has {len(tensors)} tensors; the group has {size} ranks (one per rank).")


def _check_divisible(call: str, big: Tensor, small: Tensor, size: int) -> None:
    if big.numel() != small.numel() * size:
        raise ValueError(
            f"{call}: the larger tensor has {big.numel()} elements, not the group's {size} ranks times the smaller "
            f"one's {small.numel()}."
        )


def _matching(tensor: Tensor, slot: Tensor) -> Tensor:
    """This rank's input, checked against the output slot it fills (MPI would otherwise overrun or hang)."""
    if tensor.numel() != slot.numel() or tensor.dtype != slot.dtype:
        raise ValueError(
            f"The input ({tuple(tensor.shape)} {tensor.dtype}) does not match this rank's output tensor "
            f"({tuple(slot.shape)} {slot.dtype}): every rank's output list must hold tensors of each rank's input size."
        )
    return tensor


def _split_into(flat: Tensor, outs: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for out, part in zip(outs, torch.split(flat, [o.numel() for o in outs])):
            out.copy_(part.view(out.shape))


def _counts(tensor: Tensor, splits: list[int], size: int, name: str) -> list[int]:
    """Element counts per rank from row splits of the first dimension (none given: equal shares)."""
    row = tensor[0].numel() if tensor.dim() > 0 and tensor.shape[0] > 0 else max(1, tensor.numel())
    if not splits:
        if tensor.dim() == 0 or tensor.shape[0] % size:
            raise ValueError(
                f"all_to_all_single: the first dimension ({tuple(tensor.shape)}) must divide by {size} ranks."
            )
        return [tensor.numel() // size] * size
    if len(splits) != size or sum(splits) != tensor.shape[0]:
        raise ValueError(
            f"all_to_all_single: {name}={list(splits)} must give {size} row counts summing to {tensor.shape[0]}."
        )
    return [s * row for s in splits]
