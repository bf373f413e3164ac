"""Every collective of the MPI communicator on real ranks, each assertion beside the call it checks and derived
from the rank and the world size (one body for any world size, as mpi4py's tests).

``main(OUT)`` runs on every rank within the suite's one launch per world size (``python -m tests.mpi.suite OUT``,
the ``suite_launches`` fixture); a rank that got every result right saves its word, which the test reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mpi.comm import MPICommunicator, world
from tests.helpers import save_rank_results

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8]


def main(out: Path | None = None) -> None:
    comm = world()
    assert isinstance(comm, MPICommunicator), type(comm)
    rank, size = comm.rank, comm.size

    for dtype in DTYPES:
        for op, expected in (("sum", sum(range(1, size + 1))), ("max", size), ("min", 1)):
            t = torch.full((5,), rank + 1, dtype=dtype)
            ptr = t.data_ptr()
            comm.allreduce_(t, op)
            assert t.data_ptr() == ptr and t.dtype == dtype, "allreduce_ must work in place"
            assert torch.all(t == expected), (dtype, op, t)
        if dtype.is_floating_point:
            t = torch.full((3, 2), float(rank), dtype=dtype)
            comm.allreduce_(t, "mean")
            assert torch.allclose(t.double(), torch.full((3, 2), (size - 1) / 2, dtype=torch.float64)), (dtype, t)
        else:
            try:
                comm.allreduce_(torch.ones(2, dtype=dtype), "mean")
            except TypeError:
                pass
            else:
                raise AssertionError("integer mean must be refused")

    # zero-copy: a contiguous float32 tensor is reduced in its own memory; non-contiguous ones are staged
    t = torch.arange(12.0).reshape(3, 4).t()
    comm.allreduce_(t, "sum")
    assert torch.equal(t, torch.arange(12.0).reshape(3, 4).t() * size)

    # a prepared allreduce reduces the same memory on every call (the direct path) or falls back to the general one
    for dtype, op in ((torch.float32, "sum"), (torch.int64, "max"), (torch.bfloat16, "sum"), (torch.float64, "mean")):
        t = torch.zeros(6, dtype=dtype)
        reduce = comm.prepared_allreduce(t, op)
        before = comm.bytes_sent()
        for step in range(3):
            t.fill_(rank + step)
            assert reduce() is t
            expected = {
                "sum": sum(r + step for r in range(size)),
                "max": size - 1 + step,
                "mean": sum(r + step for r in range(size)) / size,
            }[op]
            assert torch.all(t == expected), (dtype, op, step, t)
        assert comm.bytes_sent() > before

    # broadcast of tensors (every dtype, including 16-bit floats and bool) and objects
    for dtype in DTYPES + [torch.bool]:
        t = (torch.arange(4) + 10 * rank).to(dtype)
        comm.broadcast_(t, root=size - 1)
        assert torch.equal(t, (torch.arange(4) + 10 * (size - 1)).to(dtype)), (dtype, t)
    obj = comm.broadcast_object({"rank": rank, "list": [rank] * 3}, root=0)
    assert obj == {"rank": 0, "list": [0, 0, 0]}

    # allgather with unequal first dimensions, and empty tensors from some ranks (torchmetrics cat states)
    parts = comm.allgather(torch.full((rank + 1, 2), rank, dtype=torch.bfloat16))
    assert [p.shape for p in parts] == [torch.Size([r + 1, 2]) for r in range(size)]
    assert all(torch.all(p == r) for r, p in enumerate(parts))
    parts = comm.allgather(torch.tensor([]) if rank == 0 else torch.ones(rank, 3, dtype=torch.int64))
    assert parts[0].shape == (0, 3)
    assert parts[0].dtype == torch.int64
    try:
        comm.allgather(torch.zeros(2, rank + 1))
    except ValueError as err:
        assert "trailing dimensions" in str(err)
    else:
        raise AssertionError("mismatched trailing dimensions must be refused")
    # 0-d states (torchmetrics sums), and layouts beyond what travels as integers (9 dims on the last rank only)
    parts = comm.allgather(torch.tensor(float(rank), dtype=torch.float64))
    assert [p.shape for p in parts] == [torch.Size([])] * size
    assert [p.item() for p in parts] == list(range(size))
    deep = torch.full((1,) * 9, rank) if rank == size - 1 else torch.tensor([])  # empty ones take its layout
    parts = comm.allgather(deep)
    assert [p.dim() for p in parts] == [9] * size and parts[-1].item() == size - 1, [p.shape for p in parts]
    assert all(p.numel() == 0 for p in parts[:-1])

    assert comm.allgather_object(rank * 2) == [2 * r for r in range(size)]
    gathered = comm.gather_object(rank, root=0)
    assert gathered == (list(range(size)) if rank == 0 else None)
    comm.barrier()
    assert comm.local_size == size
    assert comm.num_nodes == 1
    assert comm.node_rank == 0
    assert comm.bytes_sent() > 0
    print(f"rank {rank}: collectives ok")
    if out is not None:
        save_rank_results(out, "collectives", {"ok": True})


@pytest.mark.mpi
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_on_real_ranks(world, suite_launches):
    assert [r["ok"] for r in suite_launches(world).results("collectives")] == [True] * world
