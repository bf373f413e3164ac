"""torch.distributed over MPI, side by side in one launch: the mpi4py backend's all_reduce against a raw mpi4py
``Allreduce`` of the same bytes and against gloo (4 KB to 25 MB), then a training step of DDP over mpi4py, DDP over
gloo and MPIStrategy.

    python -m recipes.benchmarks.distributed --ranks 2 --out docs/distributed-benchmark

launches ``mpirun`` itself. Variants are interleaved and repeated; medians are reported with the machine they ran
on (``results.json`` and ``table.md`` in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 25 << 20]
TRAINING = ("ddp_mpi4py", "ddp_gloo", "mpi_strategy")


def allreduce_times(repeats: int) -> dict[str, dict[int, float]]:
    """Median seconds per all_reduce of float32 tensors of each size, for each path."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    mpi_group = dist.new_group(backend="mpi4py")  # the default group is gloo: both in one process
    times: dict[str, dict[int, list[float]]] = {"raw_mpi4py": {}, "mpi4py_backend": {}, "gloo": {}}
    for size in SIZES:
        tensor = torch.ones(size // 4)
        buffer = tensor.numpy()
        paths = {
            "raw_mpi4py": lambda: comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM),
            "mpi4py_backend": lambda: dist.all_reduce(tensor, group=mpi_group),
            "gloo": lambda: dist.all_reduce(tensor),
        }
        calls = max(5, min(200, (64 << 20) // size))
        for repeat in range(repeats):
            order = list(paths)[repeat % 3 :] + list(paths)[: repeat % 3]  # interleaved, rotated
            for name in order:
                comm.Barrier()
                paths[name]()  # warm
                start = time.perf_counter()
                for _ in range(calls):
                    paths[name]()
                elapsed = (time.perf_counter() - start) / calls
                slowest = comm.allreduce(elapsed, op=MPI.MAX)
                times[name].setdefault(size, []).append(slowest)
    return {name: {size: statistics.median(v) for size, v in per.items()} for name, per in times.items()}


def step_times(variant: str, steps: int) -> list[float]:
    """Seconds per optimizer step of an MLP (4.2M parameters, batch 64 per rank) under ``variant``."""
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mpi import MPIStrategy

    class MLP(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10)
            )

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Timer(Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.stamps.append(time.perf_counter())

    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64 * world * (steps + 1), 512), torch.randint(0, 10, (64 * world * (steps + 1),)))
    strategy = {
        "ddp_mpi4py": lambda: DDPStrategy(process_group_backend="mpi4py"),
        "ddp_gloo": lambda: DDPStrategy(process_group_backend="gloo"),
        "mpi_strategy": lambda: MPIStrategy(num_threads=1),
    }[variant]()
    timer = Timer()
    Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=world if variant != "mpi_strategy" else "auto",
        max_steps=steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    ).fit(MLP(), DataLoader(data, batch_size=64))
    return [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]  # the first step (warm-up) is left out


def rank_main(out: Path, stage: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    import lightning_mpi  # noqa: F401 - registers the backend

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    if stage == "allreduce":
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        port = comm.bcast(find_free_network_port() if comm.Get_rank() == 0 else None)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(), world_size=comm.Get_size()
        )
        result: object = allreduce_times(repeats)
    else:
        result = step_times(stage, steps=20)
    if comm.Get_rank() == 0:
        (out / f"{stage}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/distributed-benchmark"))
    parser.add_argument("--rank-stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_stage:
        rank_main(args.out, args.rank_stage, args.repeats)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    from tools.mpirun import launcher, mpi_env

    mpirun, flavour = launcher()
    extra = ["--oversubscribe"] if flavour == "openmpi" else []

    def launch(stage: str) -> None:
        cmd = [
            mpirun,
            "-n",
            str(args.ranks),
            *extra,
            sys.executable,
            "-m",
            "recipes.benchmarks.distributed",
            "--rank-stage",
            stage,
            "--out",
            str(args.out.resolve()),
            "--repeats",
            str(args.repeats),
        ]
        subprocess.run(cmd, check=True, env=mpi_env({"OMP_NUM_THREADS": "1"}), timeout=1200)

    launch("allreduce")
    steps: dict[str, list[float]] = {v: [] for v in TRAINING}
    for repeat in range(3):  # one launch per variant and repeat, interleaved
        for variant in TRAINING[repeat % 3 :] + TRAINING[: repeat % 3]:
            launch(variant)
            steps[variant] += json.loads((args.out / f"{variant}.json").read_text())
    allreduce = json.loads((args.out / "allreduce.json").read_text())
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.ranks} ranks, {flavour}"
    results = {
        "machine": machine,
        "allreduce_seconds": allreduce,
        "step_seconds_median": {v: statistics.median(t) for v, t in steps.items()},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Machine: {machine}. Medians over {args.repeats} interleaved repeats (all_reduce) and 3 launches per "
        "variant (training steps).",
        "",
        "| float32 bytes | raw mpi4py Allreduce (us) | mpi4py backend (us) | ratio | gloo (us) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size in SIZES:
        raw, ours, gloo = (allreduce[k][str(size)] * 1e6 for k in ("raw_mpi4py", "mpi4py_backend", "gloo"))
        lines.append(f"| {size:,} | {raw:.0f} | {ours:.0f} | {ours / raw:.2f} | {gloo:.0f} |")
    lines += ["", "| training step (MLP 4.2M parameters, batch 64 per rank) | ms per step |", "|---|---:|"]
    lines += [f"| {v} | {results['step_seconds_median'][v] * 1e3:.1f} |" for v in TRAINING]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
