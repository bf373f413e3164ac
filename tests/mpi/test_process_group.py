"""The ``"mpi4py"`` torch.distributed backend: every collective against exact expectations and against gloo.

The rank code is ``exercise`` below: one body for any world size, expectations derived from rank and size, each
assertion beside the call it checks. ``python -m tests.mpi.test_process_group OUT BACKEND`` runs it under mpirun
with ``mpi4py`` (``init_method="mpi4py://"``) or ``gloo`` (a TCP store, the reference) and saves what every call
returned; the tests launch both and compare.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.mpi

DTYPES = (torch.float32, torch.float64, torch.int64, torch.bfloat16)


class Calls:
    """Runs each named call, keeps its result for the comparison with gloo; a call gloo refuses is noted."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.results: dict[str, Any] = {}
        self.refused: list[str] = []

    def run(self, name: str, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except (RuntimeError, ValueError) as error:
            if self.backend == "mpi4py":
                raise
            self.refused.append(f"{name}: {str(error).splitlines()[0]}")
            return None
        self.results[name] = result
        return result


def exercise(backend: str) -> Calls:
    rank, size = dist.get_rank(), dist.get_world_size()
    calls = Calls(backend)
    assert dist.get_backend() == backend

    # all_reduce, every op MPI has, several dtypes (bf16 reduced in float32)
    ops = {
        "sum": dist.ReduceOp.SUM,
        "product": dist.ReduceOp.PRODUCT,
        "min": dist.ReduceOp.MIN,
        "max": dist.ReduceOp.MAX,
    }
    for dtype in DTYPES:
        expected = {
            "sum": sum(range(1, size + 1)),
            "product": torch.arange(1, size + 1).prod().item(),
            "min": 1,
            "max": size,
        }
        for name, op in ops.items():

            def all_reduce(dtype=dtype, op=op) -> torch.Tensor:
                t = torch.full((5,), rank + 1, dtype=dtype)
                dist.all_reduce(t, op=op)
                return t

            out = calls.run(f"all_reduce {name} {dtype}", all_reduce)
            if out is not None:
                assert out.dtype == dtype and torch.equal(out, torch.full((5,), expected[name], dtype=dtype)), (
                    name,
                    out,
                )
    for name, op in {"band": dist.ReduceOp.BAND, "bor": dist.ReduceOp.BOR, "bxor": dist.ReduceOp.BXOR}.items():

        def bitwise(op=op) -> torch.Tensor:
            t = torch.tensor([1 << rank, 7], dtype=torch.int64)
            dist.all_reduce(t, op=op)
            return t

        out = calls.run(f"all_reduce {name}", bitwise)
        if out is not None:
            bits = [1 << r for r in range(size)]
            want = {"band": 0 if size > 1 else 1, "bor": sum(bits), "bxor": sum(bits)}[name]
            assert out[0].item() == want and out[1].item() == (7 if name != "bxor" else 7 * (size % 2)), (name, out)

    def average() -> torch.Tensor:
        t = torch.tensor([float(rank), 2.0])
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        return t

    out = calls.run("all_reduce avg", average)
    if out is not None:
        assert torch.allclose(out, torch.tensor([(size - 1) / 2, 2.0]))

    def integer_average() -> torch.Tensor:
        t = torch.tensor([rank, 3 * rank + 1], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        return t

    out = calls.run("all_reduce avg int64", integer_average)
    if out is not None:  # truncated, as NCCL's (and Lightning's division over gloo)
        assert out.tolist() == [sum(range(size)) // size, sum(3 * r + 1 for r in range(size)) // size], out

    def non_contiguous() -> torch.Tensor:
        t = torch.arange(12.0).reshape(3, 4).t() * (rank + 1)
        dist.all_reduce(t)
        return t

    out = calls.run("all_reduce non-contiguous", non_contiguous)
    assert torch.equal(out, torch.arange(12.0).reshape(3, 4).t() * sum(range(1, size + 1)))

    def coalesced() -> list[torch.Tensor]:
        ts = [torch.full((2,), float(rank)), torch.full((3,), 1.0)]
        dist.all_reduce_coalesced(ts)
        return ts

    out = calls.run("all_reduce_coalesced", coalesced)
    if out is not None:
        assert out[0].tolist() == [float(sum(range(size)))] * 2
        assert out[1].tolist() == [float(size)] * 3

    # broadcast and reduce from every root
    for root in range(size):

        def broadcast(root=root) -> torch.Tensor:
            t = torch.full((3,), float(rank), dtype=torch.float64)
            dist.broadcast(t, src=root)
            return t

        assert calls.run(f"broadcast root {root}", broadcast).tolist() == [float(root)] * 3

        def reduce(root=root) -> torch.Tensor:
            t = torch.full((2,), rank + 1, dtype=torch.int64)
            dist.reduce(t, dst=root, op=dist.ReduceOp.SUM)
            return t if rank == root else None  # elsewhere the tensor's contents are unspecified (gloo: scratch)

        out = calls.run(f"reduce root {root}", reduce)
        if rank == root:
            assert out.tolist() == [sum(range(1, size + 1))] * 2

    # gathers
    def all_gather() -> list[torch.Tensor]:
        outs = [torch.empty(2, 3) for _ in range(size)]
        dist.all_gather(outs, torch.full((2, 3), float(rank)))
        return outs

    out = calls.run("all_gather", all_gather)
    assert all(torch.equal(t, torch.full((2, 3), float(r))) for r, t in enumerate(out))

    def all_gather_uneven() -> list[torch.Tensor]:
        outs = [torch.empty(r + 1, 2) for r in range(size)]  # rank r contributes r + 1 rows
        dist.all_gather(outs, torch.full((rank + 1, 2), float(rank)))
        return outs

    out = calls.run("all_gather uneven", all_gather_uneven)
    if out is not None:
        assert all(torch.equal(t, torch.full((r + 1, 2), float(r))) for r, t in enumerate(out))

    def all_gather_bf16() -> list[torch.Tensor]:
        outs = [torch.empty(4, dtype=torch.bfloat16) for _ in range(size)]
        dist.all_gather(outs, torch.full((4,), rank + 0.5, dtype=torch.bfloat16))
        return outs

    out = calls.run("all_gather bf16", all_gather_bf16)
    if out is not None:
        assert [t[0].item() for t in out] == [r + 0.5 for r in range(size)]

    def all_gather_single() -> torch.Tensor:
        out = torch.empty(size * 2, dtype=torch.int64)
        dist.all_gather_single(out, torch.tensor([rank, -rank]))
        return out

    out = calls.run("all_gather_single", all_gather_single)
    assert out.tolist() == [v for r in range(size) for v in (r, -r)]

    def gather() -> list[torch.Tensor] | None:
        outs = [torch.empty(3) for _ in range(size)] if rank == size - 1 else None
        dist.gather(torch.full((3,), float(rank * 10)), outs, dst=size - 1)
        return outs

    out = calls.run("gather", gather)
    if rank == size - 1:
        assert [t[0].item() for t in out] == [r * 10.0 for r in range(size)]

    def scatter() -> torch.Tensor:
        out = torch.empty(2)
        parts = [torch.full((2,), float(r) + 0.25) for r in range(size)] if rank == 0 else None
        dist.scatter(out, parts, src=0)
        return out

    assert calls.run("scatter", scatter).tolist() == [rank + 0.25] * 2

    # reduce-scatter and all-to-all
    def reduce_scatter() -> torch.Tensor:
        out = torch.empty(2)
        dist.reduce_scatter(out, [torch.full((2,), float(r + rank)) for r in range(size)])
        return out

    out = calls.run("reduce_scatter", reduce_scatter)
    if out is not None:
        assert out.tolist() == [float(size * rank + sum(range(size)))] * 2

    def reduce_scatter_single() -> torch.Tensor:
        out = torch.empty(3)
        dist.reduce_scatter_single(out, torch.arange(3.0 * size) + rank)
        return out

    out = calls.run("reduce_scatter_single", reduce_scatter_single)
    if out is not None:
        want = [size * (3 * rank + i) + sum(range(size)) for i in range(3)]
        assert out.tolist() == [float(v) for v in want]

    def all_to_all_single() -> torch.Tensor:
        out = torch.empty(size)
        dist.all_to_all_single(out, torch.arange(float(size)) + 100 * rank)
        return out

    assert calls.run("all_to_all_single", all_to_all_single).tolist() == [100.0 * r + rank for r in range(size)]

    def all_to_all_uneven() -> torch.Tensor:
        # rank r sends r + 1 rows to every rank; each row holds (sender, receiver)
        sent = torch.tensor([[rank, dest] for dest in range(size) for _ in range(rank + 1)], dtype=torch.int64)
        out = torch.empty((sum(r + 1 for r in range(size)), 2), dtype=torch.int64)
        dist.all_to_all_single(out, sent, [r + 1 for r in range(size)], [rank + 1] * size)
        return out

    out = calls.run("all_to_all_single uneven", all_to_all_uneven)
    assert out.tolist() == [[r, rank] for r in range(size) for _ in range(r + 1)]

    def all_to_all() -> list[torch.Tensor]:
        outs = [torch.empty(2) for _ in range(size)]
        dist.all_to_all(outs, [torch.full((2,), float(rank * size + d)) for d in range(size)])
        return outs

    out = calls.run("all_to_all", all_to_all)
    if out is not None:
        assert [t[0].item() for t in out] == [float(r * size + rank) for r in range(size)]

    # objects
    def objects() -> list[Any]:
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, {"rank": rank, "text": "x" * rank})
        listed = [f"from {rank}", rank]
        dist.broadcast_object_list(listed, src=size - 1)
        return [gathered, listed]

    gathered, listed = calls.run("objects", objects)
    assert gathered == [{"rank": r, "text": "x" * r} for r in range(size)]
    assert listed == [f"from {size - 1}", size - 1]

    # asynchronous work: started, then completed by wait() or through its future
    def asynchronous() -> list[torch.Tensor]:
        tensors = [torch.full((1000,), float(rank + i)) for i in range(4)]
        works = [dist.all_reduce(t, async_op=True) for t in tensors]
        futures = [w.get_future() for w in works[2:]]
        for w in works[:2]:
            w.wait()
        torch.futures.wait_all(futures)
        return [t[:1] for t in tensors]

    out = calls.run("async all_reduce", asynchronous)
    assert [t.item() for t in out] == [float(sum(range(size)) + i * size) for i in range(4)]

    # point to point with tags, in a ring; ranks exchange both ways without deadlock
    if size > 1:

        def ring() -> list[torch.Tensor]:
            right, left = (rank + 1) % size, (rank - 1) % size
            sends = [dist.isend(torch.full((3,), float(rank * 10 + tag)), right, tag=tag) for tag in (1, 2)]
            second, first = torch.empty(3), torch.empty(3)
            dist.recv(second, src=left, tag=2)  # tags select the message, not arrival order
            dist.recv(first, src=left, tag=1)
            for work in sends:
                work.wait()
            return [first, second]

        first, second = calls.run("send/recv", ring)
        left = (rank - 1) % size
        assert first.tolist() == [left * 10.0 + 1] * 3
        assert second.tolist() == [left * 10.0 + 2] * 3

    # functional collectives and DeviceMesh find the group by its name (kept by the Python group itself)
    def functional() -> list[torch.Tensor]:
        import torch.distributed._functional_collectives as fc

        world = dist.group.WORLD
        reduced = fc.all_reduce(torch.full((2,), float(rank + 1)), "sum", world)
        gathered = fc.all_gather_tensor(torch.full((2,), float(rank)), 0, world)
        scattered = fc.reduce_scatter_tensor(torch.arange(2.0 * size) + rank, "sum", 0, world)
        return [torch.as_tensor(x).clone() for x in (reduced, gathered, scattered)]

    reduced, gathered, scattered = calls.run("functional collectives", functional)
    assert reduced.tolist() == [float(sum(range(1, size + 1)))] * 2
    assert gathered.tolist() == [float(r) for r in range(size) for _ in range(2)]
    assert scattered.tolist() == [float(size * (2 * rank + i) + sum(range(size))) for i in range(2)]

    def device_mesh() -> torch.Tensor:
        from torch.distributed.device_mesh import init_device_mesh

        t = torch.ones(1)
        dist.all_reduce(t, group=init_device_mesh("cpu", (size,)).get_group())
        return t

    assert calls.run("device_mesh", device_mesh).item() == float(size)

    if size > 1:

        def batched_p2p() -> torch.Tensor:
            received = torch.empty(2)
            ops = [
                dist.P2POp(dist.isend, torch.full((2,), float(rank)), (rank + 1) % size),
                dist.P2POp(dist.irecv, received, (rank - 1) % size),
            ]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            return received

        assert calls.run("batch_isend_irecv", batched_p2p).tolist() == [float((rank - 1) % size)] * 2

    # sub-groups: the even ranks, then every rank but 0
    evens = list(range(0, size, 2))
    even_group = dist.new_group(evens)
    if rank in evens:

        def subgroup() -> torch.Tensor:
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=even_group)
            return t

        assert calls.run("new_group evens", subgroup).item() == float(sum(evens))
    if size > 1:
        rest = list(range(1, size))
        rest_group = dist.new_group(rest)
        if rank in rest:

            def broadcast_in_group() -> torch.Tensor:
                t = torch.tensor([float(rank)])
                dist.broadcast(t, group_src=0, group=rest_group)
                return t

            assert calls.run("new_group broadcast", broadcast_in_group).item() == 1.0

    # a gloo group beside the default one (Lightning's prepare_data barrier, libraries' CPU collectives): gloo meets
    # its peers through the default group's store, which every rank must share
    def gloo_group() -> torch.Tensor:
        group = dist.new_group(backend="gloo")
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t, group=group)
        group.monitored_barrier()
        dist.destroy_process_group(group)
        return t

    assert calls.run("new_group gloo", gloo_group).item() == size * (size + 1) / 2

    dist.barrier()
    return calls


def init(backend: str) -> None:
    if backend == "mpi4py":
        import lightning_mpi  # noqa: F401 - registers the backend

        dist.init_process_group("mpi4py", init_method="mpi4py://")
        return
    from lightning.fabric.plugins.environments.lightning import find_free_network_port
    from mpi4py import MPI  # the reference needs a TCP store: rank 0's port, told to the others over MPI

    comm = MPI.COMM_WORLD
    port = comm.bcast(find_free_network_port() if comm.Get_rank() == 0 else None)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(), world_size=comm.Get_size()
    )


def main(out: Path, backend: str) -> None:
    init(backend)
    calls = exercise(backend)
    torch.save(
        {"world": dist.get_world_size(), "results": calls.results, "refused": calls.refused},
        out / f"{backend}.rank{dist.get_rank()}.pt",
    )
    dist.destroy_process_group()


# -- the tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def launched(request, tmp_path_factory):
    from tests.mpirun import launch_scenario

    world = request.param
    out = tmp_path_factory.mktemp(f"pg{world}")
    launches = {backend: launch_scenario(__name__, world, out, backend, timeout=300) for backend in ("mpi4py", "gloo")}
    return world, {backend: launch.results(backend) for backend, launch in launches.items()}


def test_every_collective_meets_its_expectation_on_every_rank(launched):
    world, ranks = launched
    mpi = ranks["mpi4py"]
    assert len(mpi) == world
    assert all(r["world"] == world for r in mpi)
    assert all(r["refused"] == [] for r in mpi)
    assert len(mpi[0]["results"]) >= 40


def test_equals_gloo_on_every_call_gloo_makes(launched):
    _, ranks = launched
    for mpi, gloo in zip(ranks["mpi4py"], ranks["gloo"]):
        compared = 0
        for name, expected in gloo["results"].items():
            assert _same(mpi["results"][name], expected), name
            compared += 1
        assert compared >= 30, gloo["refused"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_registering_initialises_nothing():
    import subprocess

    code = (
        "import sys, lightning_mpi, torch.distributed as dist; "
        "print('mpi4py' in dist.Backend.backend_list, dist.is_initialized(), 'mpi4py.MPI' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "False", "False"]


def test_one_process_without_a_launcher():
    import subprocess

    code = (
        "import torch, lightning_mpi, torch.distributed as dist; dist.init_process_group('mpi4py', "
        "init_method='mpi4py://'); t = torch.ones(2); dist.all_reduce(t); o = [torch.empty(2)]; "
        "dist.all_gather(o, t); print(dist.get_world_size(), t.tolist(), o[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[0] == "1 [1.0, 1.0] [1.0, 1.0]"


def test_unsupported_op_is_refused_on_every_rank(tmp_path):
    from tests.mpirun import run_mpi

    script = tmp_path / "premul.py"
    script.write_text(
        "import torch, lightning_mpi, torch.distributed as dist\n"
        "dist.init_process_group('mpi4py', init_method='mpi4py://')\n"
        "try:\n"
        "    dist.all_reduce(torch.ones(2), op=dist._make_nccl_premul_sum(2.0))\n"
        "except ValueError as error:\n"
        "    print(f'rank {dist.get_rank()} refused: {error}', flush=True)\n"
    )
    result = run_mpi(2, [str(script)], timeout=120)
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        assert f"rank {rank} refused: ReduceOp.PREMUL_SUM is not supported" in result.stdout


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])


def test_mismatched_collectives_are_reported_on_every_rank_and_end_the_job(tmp_path):
    import time

    from tests.mpirun import run_mpi

    script = tmp_path / "mismatch.py"
    script.write_text(
        "import datetime, torch, lightning_mpi, torch.distributed as dist\n"
        "dist.init_process_group('mpi4py', init_method='mpi4py://', timeout=datetime.timedelta(seconds=3))\n"
        "t = torch.ones(4)\n"
        "dist.all_reduce(t) if dist.get_rank() == 0 else dist.barrier()  # a rank calls another collective\n"
        "dist.all_reduce(t)\n"
    )
    start = time.monotonic()
    result = run_mpi(2, [str(script)], timeout=120)
    assert result.returncode != 0, "the job must end"
    assert time.monotonic() - start < 60
    assert "did not complete within 3 s" in result.stderr
    assert "Aborting the job" in result.stderr


def test_bitwise_reduction_of_floats_is_refused_on_every_rank(tmp_path):
    from tests.mpirun import run_mpi

    script = tmp_path / "band.py"
    script.write_text(
        "import torch, lightning_mpi, torch.distributed as dist\n"
        "dist.init_process_group('mpi4py', init_method='mpi4py://')\n"
        "try:\n"
        "    dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BAND)\n"
        "except TypeError as error:\n"
        "    print(f'rank {dist.get_rank()} refused: {error}', flush=True)\n"
        "dist.barrier()\n"
    )
    result = run_mpi(2, [str(script)], timeout=120)
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        assert f"rank {rank} refused: The bitwise reduction 'band' needs an integer or bool tensor" in result.stdout


def test_a_rank_that_never_joins_the_group_is_reported_and_ends_the_job(tmp_path):
    from tests.mpirun import run_mpi

    script = tmp_path / "absent.py"
    script.write_text(
        "import datetime, time, lightning_mpi, torch.distributed as dist\n"
        "from lightning_mpi.comm import world\n"
        "if world().rank == 0:\n"
        "    dist.init_process_group('mpi4py', init_method='mpi4py://', timeout=datetime.timedelta(seconds=3))\n"
        "else:\n"
        "    time.sleep(100)  # busy elsewhere: never creates the group\n"
    )
    result = run_mpi(2, [str(script)], timeout=90)
    assert result.returncode != 0
    assert "new process group of ranks [0, 1] did not complete within 3 s" in result.stderr
    assert "ranks that did not arrive: [1]" in result.stderr
