"""PyTorch's own distributed test suite (``torch/testing/_internal/distributed/distributed_test.py``, shipped in the
torch wheel) run with the ``"mpi4py"`` backend, and with gloo as the reference, under ``mpirun``.

PyTorch's harness spawns its own processes; here every rank of one ``mpirun`` launch runs the same selected tests in
the same order, as PyTorch once ran its source-built MPI backend. Each rank appends its outcome per test to a JSON
lines file as it goes, so a launch that hangs or dies keeps what it had and the next launch resumes after the test
that broke it (recorded as "hang or crash").

    python -m tests.conformance.torch_suite --ranks 2 3 --out docs/conformance/torch

writes ``results-{backend}-{ranks}.jsonl`` and ``report.md`` (every test that fails with mpi4py but passes with
gloo, with the reason) into ``--out``. Nothing of PyTorch's code is copied: it is imported from the installed wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import unittest
from datetime import timedelta
from pathlib import Path

#: Tests that exercise what a process-group backend provides; DDP, CUDA and NCCL-specific tests are out of scope.
SELECTION = re.compile(
    r"^test_(all_reduce|allreduce|reduce|broadcast|all_gather|allgather|gather|scatter|all_to_all|alltoall|barrier|"
    r"send_recv|isend|irecv|batch_isend_irecv|get_rank|get_backend|backend|new_group|destroy|"
    r"all_gather_object|gather_object|scatter_object|broadcast_object|reduce_scatter|irecv|sparse_all_reduce|"
    r"monitored_barrier|nccl|average_parameters|DistributedDataParallel_SyncBatchNorm|ddp_comm_hook|"
    r"DistributedDataParallel(?!.*(?:SyncBatchNorm|non_default_stream|cuda|Gpu|gpu)))"
)
#: Capabilities the harness asks a backend for, which mpi4py has on CPU.
FEATURES = ("ddp", "subgroup", "plugin")


def run_rank(out: Path, backend: str, done: set[str]) -> None:
    """On every rank: initialise ``backend``, run the selected tests not in ``done``, append each outcome."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    temp = comm.bcast(tempfile.mkdtemp(prefix="torch-suite-") if rank == 0 else None)
    if rank == 0:
        for sub in ("barrier", "test_dir", "init_dir"):
            os.makedirs(os.path.join(temp, sub), exist_ok=True)
    comm.Barrier()
    os.environ.update(
        {
            "PYTORCH_PRINT_REPRO_ON_FAILURE": "0",
            "BACKEND": backend,
            "WORLD_SIZE": str(size),
            "TEMP_DIR": temp,
            "INIT_METHOD": "mpi4py://" if backend == "mpi4py" else "env://",
        }
    )

    import torch.distributed as dist
    from torch.testing._internal.common_distributed import TEST_SKIPS, DistTestCases
    from torch.testing._internal.distributed import distributed_test as dt

    import lightning_mpi  # noqa: F401 - registers the backend

    skips = {skip.exit_code: skip.message for skip in TEST_SKIPS.values()}
    for feature in FEATURES:
        DistTestCases.backend_feature.setdefault(feature, set()).add(backend)
    if backend == "mpi4py":
        # A collective that stalls for a minute is reported and aborts the launch (the next one resumes).
        dist.init_process_group("mpi4py", init_method="mpi4py://", timeout=timedelta(seconds=60))
    else:
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        port = comm.bcast(find_free_network_port() if rank == 0 else None)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=60)
        )

    from torch.testing._internal.common_utils import TestCase  # torch's assertions (tensor-aware assertEqual, ...)

    class Case(dt.DistributedTest._DistTestBase, TestCase):  # type: ignore[misc]
        file_name = os.path.join(temp, "init_dir", "shared_init_file")

        @property
        def rank(self) -> int:
            return rank

        @property
        def world_size(self) -> str:
            return str(size)

    only = re.compile(os.environ.get("TORCH_SUITE_ONLY", ""))
    names = sorted(n for n in dir(Case) if SELECTION.match(n) and only.search(n) and n not in done)
    results = out / f"results-{backend}-{size}.jsonl"
    for name in names:
        dt.Barrier.barrier_id = 0  # the harness's file barrier counts per process: every rank starts each test at 0
        if rank == 0:
            dt.Barrier.init()
            with (out / f"current-{backend}-{size}").open("w") as handle:
                handle.write(name)
        comm.Barrier()
        outcome = unittest.TestResult()
        start = time.monotonic()
        Case(name).run(outcome)
        status, reason = _status(outcome, skips)
        record = {
            "test": name,
            "rank": rank,
            "status": status,
            "reason": reason,
            "seconds": round(time.monotonic() - start, 2),
        }
        with results.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        comm.Barrier()
    if rank == 0:
        (out / f"current-{backend}-{size}").unlink(missing_ok=True)


def _status(outcome: unittest.TestResult, skips: dict[int, str]) -> tuple[str, str]:
    for _, text in outcome.errors:
        # PyTorch's skip decorators end the (spawned) process with an exit code that its harness reads as a skip
        code = re.search(r"SystemExit: (\d+)\s*$", text.strip())
        if code and int(code.group(1)) in skips:
            return "skipped", skips[int(code.group(1))]
    if outcome.errors or outcome.failures:
        text = (outcome.errors or outcome.failures)[0][1].strip().splitlines()
        errors = [line.strip() for line in text if re.match(r"\s*\w*(Error|Exception|Exit)\b", line)]
        return "failed", (errors or text or [""])[-1][:300]
    if outcome.skipped:
        return "skipped", outcome.skipped[0][1][:200]
    return "passed", ""


def launch(out: Path, backend: str, ranks: int, timeout: float) -> None:
    """Launch until every selected test has an outcome; a test that hangs or kills a launch is recorded as such."""
    from tests.mpirun import run_mpi

    while True:
        done = _done(out, backend, ranks)
        argv = ["-m", "tests.conformance.torch_suite", "--rank-code", backend, str(out), *sorted(done)]
        try:
            result = run_mpi(ranks, argv, timeout=timeout)
            ended, text = result.returncode == 0, result.stderr or result.stdout
        except AssertionError as hung:  # run_mpi killed the launch at its timeout
            ended, text = False, str(hung)
        current = out / f"current-{backend}-{ranks}"
        if ended and not current.exists():
            return
        broken = current.read_text() if current.exists() else None
        if broken is None or broken in done:
            raise RuntimeError(f"{backend} at {ranks} ranks failed outside a test:\n{text[-3000:]}")
        with (out / f"results-{backend}-{ranks}.jsonl").open("a") as handle:
            tail = [line for line in text.strip().splitlines() if "Error" in line or "did not complete" in line][
                -1:
            ] or [""]
            handle.write(
                json.dumps(
                    {"test": broken, "rank": -1, "status": "hang or crash", "reason": tail[0][:300], "seconds": None}
                )
                + "\n"
            )
        current.unlink()


def _done(out: Path, backend: str, ranks: int) -> set[str]:
    path = out / f"results-{backend}-{ranks}.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["test"] for line in path.read_text().splitlines() if line.strip()}


def outcomes(out: Path, backend: str, ranks: int) -> dict[str, tuple[str, str]]:
    """Per test: the worst outcome over ranks (hang/crash > failed > skipped > passed) and its reason."""
    order = ["passed", "skipped", "failed", "hang or crash"]
    merged: dict[str, tuple[str, str]] = {}
    path = out / f"results-{backend}-{ranks}.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        previous = merged.get(record["test"], ("passed", ""))
        if order.index(record["status"]) >= order.index(previous[0]):
            merged[record["test"]] = (record["status"], record["reason"])
    return merged


def report(out: Path, ranks: list[int], seconds: float | None) -> str:
    took = f" ({seconds:.0f} s)" if seconds else ""
    lines = [
        "# PyTorch's distributed tests with the mpi4py backend",
        "",
        "PyTorch's own `distributed_test.py` (from the installed torch wheel), the tests selected by "
        "`tests/conformance/torch_suite.py` (collectives, point-to-point, objects, groups, DDP on CPU), run "
        "under `mpirun` with the `mpi4py` backend and with gloo as the reference, every rank running the same "
        "tests in the same order.",
        "",
        f"Command: `python -m tests.conformance.torch_suite --ranks {' '.join(map(str, ranks))} "
        f"--out docs/conformance/torch`{took}; raw outcomes per rank in `results-<backend>-<ranks>.jsonl`.",
        "",
        "| ranks | tests | mpi4py passed | gloo passed | skipped by both | fail with both | "
        "fail with mpi4py only | fail with gloo only |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    only_mpi, both, skips = [], [], {}
    for n in ranks:
        mpi, gloo = outcomes(out, "mpi4py", n), outcomes(out, "gloo", n)
        names = sorted(set(mpi) | set(gloo))

        def status(table: dict[str, tuple[str, str]], name: str) -> str:
            return table.get(name, ("missing", ""))[0]

        bad = ("failed", "hang or crash", "missing")
        mpi_only = [t for t in names if status(mpi, t) in bad and status(gloo, t) not in bad]
        gloo_only = [t for t in names if status(gloo, t) in bad and status(mpi, t) not in bad]
        failing = [t for t in names if status(mpi, t) in bad and status(gloo, t) in bad]
        skipped = [t for t in names if status(mpi, t) == "skipped" and status(gloo, t) == "skipped"]
        for t in skipped:
            skips[mpi[t][1]] = skips.get(mpi[t][1], 0) + 1
        lines.append(
            f"| {n} | {len(names)} | {sum(status(mpi, t) == 'passed' for t in names)} | "
            f"{sum(status(gloo, t) == 'passed' for t in names)} | {len(skipped)} | {len(failing)} | "
            f"{len(mpi_only)} | {len(gloo_only)} |"
        )
        only_mpi += [f"| {n} | `{t}` | {mpi[t][0]} | {_cell(mpi[t][1])} |" for t in mpi_only]
        both += [f"| {n} | `{t}` | {_cell(mpi[t][1])} | {_cell(gloo[t][1])} |" for t in failing]
    lines += [
        "",
        "## Fails with mpi4py, passes with gloo",
        "",
        "| ranks | test | outcome | reason |",
        "|---:|---|---|---|",
        *(only_mpi or ["| - | none | | |"]),
        "",
        "## Fails with both (the harness runs PyTorch's tests outside their spawning test case)",
        "",
        "| ranks | test | mpi4py | gloo |",
        "|---:|---|---|---|",
        *(both or ["| - | none | | |"]),
        "",
        "## Skipped by both, by reason (tests x world sizes)",
        "",
        "| reason | count |",
        "|---|---:|",
        *[f"| {_cell(reason)} | {count} |" for reason, count in sorted(skips.items(), key=lambda kv: -kv[1])],
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:200]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-code":
        run_rank(Path(sys.argv[3]), sys.argv[2], set(sys.argv[4:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--out", type=Path, default=Path("docs/conformance/torch"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one launch may take")
    parser.add_argument("--backends", nargs="+", default=["mpi4py", "gloo"], help="run these again (others kept)")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md from the results in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        (args.out / "report.md").write_text(report(args.out, args.ranks, None))
        return
    start = time.monotonic()
    for n in args.ranks:
        for backend in args.backends:
            (args.out / f"results-{backend}-{n}.jsonl").unlink(missing_ok=True)
            launch(args.out.resolve(), backend, n, args.timeout)
    (args.out / "report.md").write_text(report(args.out, args.ranks, time.monotonic() - start))
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
