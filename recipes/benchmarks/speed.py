"""Side-by-side speed of MPIStrategy: epoch times against DDP (gloo), the no-communication ceiling and a
hand-written PyTorch + mpi4py loop, and an allreduce micro-benchmark.

    python -m recipes.benchmarks.speed --ranks 1 2 --out benchmark-results      # launches mpirun itself

Each rank count is one ``mpirun`` launch running every variant in turn (start-up is paid once); every
variant trains the same model on the same in-memory data with the same per-rank batch and one torch thread per
rank, and reports the median epoch time over each workload's epochs after a warm-up epoch. Variants run
round-robin ``--repeats`` times after one untimed round; the table holds the median of the medians. Results:
``results.json``, ``benchmark.md`` and PNG plots in ``--out``.

The raw baselines call mpi4py directly on purpose: they are what the strategy is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_mpi.files import save_figure, write_atomically

WORKLOADS = {
    # name: (samples, per-rank batch, timed epochs); sizes of the recipes (752 LSTM windows, 3,200 CNN images).
    # The recurrent epochs are a few steps long: many of them make the median stable.
    "lstm": (752, 128, 30),
    "gru": (752, 100, 30),
    "cnn": (3200, 64, 4),
}
VARIANTS = ("mpi_allreduce", "mpi_average", "ceiling", "plain_lightning", "ddp_gloo", "handwritten")
# plain_lightning: a default single-device Trainer per rank on the rank's shard, no MPIStrategy at all - at 1 rank
# the run a user makes without MPI, at N ranks Lightning's own floor for N processes that never communicate.
SIZES_KB = (4, 64, 256, 1024, 4096, 25600)
_WRITTEN = ("results.json", "benchmark.md", "epoch_time.png", "allreduce.png")


# -- workloads ---------------------------------------------------------------------------------------------


def build(workload: str) -> tuple[Any, Any, Callable]:
    """(LightningModule, dataset, loss function) for a workload, with fixed seeds."""
    import torch
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    samples, _, _ = WORKLOADS[workload]
    if workload == "cnn":
        from recipes.classification.data import load_digits
        from recipes.classification.models import CNNClassifier

        images, labels = load_digits()
        reps = -(-samples // len(labels))
        data = TensorDataset(images.repeat(reps, 1, 1, 1)[:samples], labels.repeat(reps)[:samples])
        return CNNClassifier(), data, torch.nn.functional.cross_entropy
    from recipes.forecasting.models import GRUForecaster, LSTMForecaster

    module = (LSTMForecaster if workload == "lstm" else GRUForecaster)(window=14, hidden_size=50)
    x = torch.randn(samples, 14, 1)
    y = x[:, -1] * 0.9
    data = TensorDataset(x, y, y, y)  # (inputs, targets, last value, target in cases): the recipe's batch layout
    return module, data, torch.nn.functional.mse_loss


# -- variants (run inside each rank) -----------------------------------------------------------------------


def epoch_timer() -> Any:
    """A Lightning callback recording wall time per training epoch in ``.times``."""
    from lightning.pytorch import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.times.append(time.perf_counter() - self._start)

    return EpochTimer()


def lightning_epochs(workload: str, variant: str, epochs: int) -> list[float]:
    """Epoch times of ``epochs`` epochs after a warm-up epoch, for a Lightning variant."""
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mpi import MPIStrategy

    module, data, _ = build(workload)
    _, batch, _ = WORKLOADS[workload]
    if variant == "plain_lightning":
        rank, size = _world()
        data = TensorDataset(*(t[rank::size] for t in data.tensors))
    strategy: Any = {
        "plain_lightning": lambda: SingleDeviceStrategy("cpu"),
        "mpi_allreduce": lambda: MPIStrategy(num_threads=1),
        "mpi_average": lambda: MPIStrategy(sync="average", every_n_steps=8, num_threads=1),
        "ceiling": lambda: MPIStrategy(sync="ensemble", num_threads=1),
        "ddp_gloo": lambda: DDPStrategy(process_group_backend="gloo"),
    }[variant]()
    if variant == "ddp_gloo" and torch.distributed.is_initialized() and torch.distributed.get_backend() != "gloo":
        torch.distributed.destroy_process_group()  # MPIStrategy's mpi4py group: DDP would run over it, not gloo
    timer = epoch_timer()
    trainer = Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_epochs=epochs + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
        **({"devices": _world()[1]} if variant == "ddp_gloo" else {}),
    )
    trainer.fit(module, DataLoader(data, batch_size=batch, shuffle=True))
    return timer.times[1:]


def handwritten_epochs(workload: str, epochs: int) -> list[float]:
    """The studies' way: data in memory, a plain loop, one flat mpi4py Allreduce of the gradients per step."""
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    module, data, loss_fn = build(workload)
    _, batch, _ = WORKLOADS[workload]
    optimizer = module.configure_optimizers()
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params))
    tensors = data.tensors
    shard = torch.arange(len(tensors[0]))[rank::size]
    times = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        order = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(epoch))]
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            optimizer.zero_grad()
            loss_fn(module(tensors[0][idx]), tensors[1][idx]).backward()
            torch.cat([p.grad.reshape(-1) for p in params], out=flat)
            comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
            flat /= size
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def allreduce_micro(repeats: int) -> dict[str, dict[int, float]]:
    """Seconds per allreduce of ``SIZES_KB`` float32 gradients: raw mpi4py, the strategy's path, gloo."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from lightning_mpi.comm import MPICommunicator
    from lightning_mpi.policies import GradientAllreduce

    raw_comm = MPI.COMM_WORLD
    rank, _ = _world()
    out: dict[str, dict[int, float]] = {k: {} for k in ("raw_mpi4py", "strategy", "strategy_no_watchdog", "gloo")}
    communicators = {"strategy": MPICommunicator(timeout=600.0), "strategy_no_watchdog": MPICommunicator(timeout=None)}
    for kb in SIZES_KB:
        n = kb * 1024 // 4
        buf = torch.ones(n)
        calls = {"raw_mpi4py": lambda buf=buf: raw_comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)}
        for key, comm in communicators.items():
            layer = torch.nn.Linear(n, 1, bias=False)
            policy = GradientAllreduce()
            policy.setup(comm, layer, fitting=True, resuming=False)
            policy.before_backward(layer, synchronised=True)  # the gradient now lives in the bucket
            calls[key] = _strategy_step(policy, layer)
        calls["gloo"] = lambda buf=buf: dist.all_reduce(buf)
        # Blocks of several milliseconds: the skew with which ranks leave the barrier before each block is noise.
        per_block = 100 if kb <= 64 else 20 if kb <= 1024 else 4
        for key, seconds in _time_interleaved(calls, repeats, per_block).items():
            out[key][kb] = seconds
    for comm in communicators.values():
        if comm._monitor is not None:
            comm._monitor.stop()
    if rank == 0:
        print(json.dumps(out), flush=True)
    return out


def _strategy_step(policy: Any, layer: Any) -> Callable[[], None]:
    def step() -> None:
        policy._buckets[0].received[0] = True  # what the post-accumulate hook records during backward
        policy.after_backward(layer)

    return step


def _time_interleaved(calls: dict[str, Callable[[], None]], repeats: int, per_block: int) -> dict[str, float]:
    """Median seconds per call; the calls take turns in short blocks, so machine drift hits them alike."""
    from mpi4py import MPI

    for fn in calls.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            MPI.COMM_WORLD.Barrier()
            start = time.perf_counter()
            for _ in range(per_block):
                fn()
            samples[key].append((time.perf_counter() - start) / per_block)
    return {key: statistics.median(values) for key, values in samples.items()}


def _world() -> tuple[int, int]:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def _init_gloo() -> None:
    import torch.distributed as dist
    from lightning.fabric.plugins.environments.lightning import find_free_network_port
    from mpi4py import MPI

    rank, size = _world()
    port = MPI.COMM_WORLD.bcast(find_free_network_port() if rank == 0 else None, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)


def worker(args: argparse.Namespace) -> None:
    """Inside mpirun: every variant of every workload, then the micro-benchmark; rank 0 writes JSON."""
    import torch

    import lightning_mpi  # noqa: F401  (rank-zero printing from the first line)

    torch.set_num_threads(1)
    rank, size = _world()
    results: dict[str, Any] = {"ranks": size, "epochs": {}}
    for workload in args.workloads:
        variants = [v for v in VARIANTS if size > 1 or v not in ("mpi_average", "ceiling", "ddp_gloo")]
        epochs = round(WORKLOADS[workload][2] * args.epochs)
        medians: dict[str, list[float]] = {v: [] for v in variants}
        # Round-robin over the variants, after one untimed round: the machine drifts by tens of per cent over
        # minutes here, and consecutive runs of one variant would take that drift for a difference. Each round
        # starts one variant later, so no variant always follows the same one.
        for repeat in range(args.repeats + 1):
            for variant in variants[repeat % len(variants) :] + variants[: repeat % len(variants)]:
                times = (
                    handwritten_epochs(workload, epochs)
                    if variant == "handwritten"
                    else lightning_epochs(workload, variant, epochs)
                )
                if repeat > 0:
                    medians[variant].append(statistics.median(times))
        for variant, values in medians.items():
            results["epochs"][f"{workload}/{variant}"] = statistics.median(values)
            if rank == 0:
                print(
                    f"{size} ranks {workload:5s} {variant:14s} {statistics.median(values) * 1000:9.1f} ms/epoch",
                    flush=True,
                )
    if size > 1 and args.micro:
        import torch.distributed as dist

        if not dist.is_initialized():
            _init_gloo()
        results["allreduce"] = allreduce_micro(args.repeats * 10)
    if rank == 0:
        write_atomically(args.worker_out, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))


# -- orchestration and report --------------------------------------------------------------------------------


def launch(args: argparse.Namespace, ranks: int, out: Path) -> dict[str, Any]:
    target = out / f"ranks{ranks}.json"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="^ofi")
    cmd = [
        "mpirun",
        "-n",
        str(ranks),
        "--oversubscribe",
        sys.executable,
        "-m",
        "recipes.benchmarks.speed",
        "--worker-out",
        str(target),
        "--epochs",
        str(args.epochs),
        "--repeats",
        str(args.repeats),
        "--workloads",
        *args.workloads,
        "--micro" if args.micro else "--no-micro",
    ]
    subprocess.run(cmd, check=True, env=env, timeout=args.timeout)
    return json.loads(target.read_text())


def report(results: dict[int, dict[str, Any]], out: Path) -> str:
    lines = [f"Epoch time (ms, median) on {os.cpu_count()} cores, one torch thread per rank", ""]
    ranks = sorted(results)

    def epoch_ms(workload: str, variant: str, r: int) -> float | None:
        seconds = results[r]["epochs"].get(f"{workload}/{variant}")
        return None if seconds is None else seconds * 1000

    lines += _rank_table(ranks, epoch_ms, "{:.1f}")
    if 1 in results and len(ranks) > 1:
        lines += [
            "",
            (
                "Speed-up over one process on all the data (hand-written: over the 1-rank hand-written loop; "
                "the other variants: over the 1-rank plain Lightning run, a default single-device Trainer):"
            ),
            "",
        ]
        lines += _rank_table(ranks, lambda w, v, r: speedup(results, w, v, r), "{:.2f}")
    lines += ["", "Ratios at the largest rank count (targets of the performance issue):", ""]
    top = results[ranks[-1]]["epochs"]
    sequential = results[ranks[0]]["epochs"] if ranks[0] == 1 else {}
    for workload in WORKLOADS:
        get = lambda v, w=workload: top.get(f"{w}/{v}")
        if get("mpi_allreduce") is None:
            continue
        parts = [
            f"**{workload}**: allreduce/DDP {get('mpi_allreduce') / get('ddp_gloo'):.2f}" if get("ddp_gloo") else ""
        ]
        if get("ceiling"):
            parts.append(f"allreduce/ceiling {get('mpi_allreduce') / get('ceiling'):.2f}")
            parts.append(f"average/ceiling {get('mpi_average') / get('ceiling'):.2f}")
        parts.append(f"allreduce/hand-written {get('mpi_allreduce') / get('handwritten'):.2f}")
        if get("ceiling") and get("ddp_gloo") and get("handwritten"):
            parts.append(
                f"floors: ceiling/DDP {get('ceiling') / get('ddp_gloo'):.2f}, "
                f"ceiling/hand-written {get('ceiling') / get('handwritten'):.2f}"
            )
        for label, key in (("1-rank plain Lightning", "plain_lightning"), ("1-rank hand-written", "handwritten")):
            if sequential.get(f"{workload}/{key}") and get("ceiling"):
                change = 100 * (get("ceiling") / sequential[f"{workload}/{key}"] - 1)
                parts.append(f"ensemble (ceiling) vs {label}: {change:+.0f} % time")
        lines.append("- " + ", ".join(p for p in parts if p))
    micro = results[ranks[-1]].get("allreduce")
    if micro:
        lines += ["", f"Allreduce of float32 gradients at {ranks[-1]} ranks (µs per call):", ""]
        lines += [
            "| KB | raw mpi4py | strategy | strategy, no watchdog | gloo | strategy/raw |",
            "|---|---|---|---|---|---|",
        ]
        for kb in SIZES_KB:
            row = [micro[k][str(kb)] * 1e6 for k in ("raw_mpi4py", "strategy", "strategy_no_watchdog", "gloo")]
            lines.append(f"| {kb} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {row[1] / row[0]:.2f} |")
    text = "\n".join(lines) + "\n"
    write_atomically(out / "benchmark.md", lambda tmp: tmp.write_text(text))
    _plots(results, out)
    return text


def _rank_table(ranks: list[int], cell: Callable[[str, str, int], float | None], fmt: str) -> list[str]:
    """Markdown rows of workloads x variants over ``ranks``; a row without any value is left out."""
    lines = [
        "| workload | variant | " + " | ".join(f"{r} rank{'s' if r > 1 else ''}" for r in ranks) + " |",
        "|" + "---|" * (len(ranks) + 2),
    ]
    for workload in WORKLOADS:
        for variant in VARIANTS:
            cells = [cell(workload, variant, r) for r in ranks]
            if any(c is not None for c in cells):
                lines.append(
                    f"| {workload} | {variant} | "
                    + " | ".join("" if c is None else fmt.format(c) for c in cells)
                    + " |"
                )
    return lines


def speedup(results: dict[int, dict[str, Any]], workload: str, variant: str, ranks: int) -> float | None:
    """Epoch time of one process on all the data over the epoch time of ``variant`` at ``ranks`` ranks."""
    reference = "handwritten" if variant == "handwritten" else "plain_lightning"
    base = results.get(1, {}).get("epochs", {}).get(f"{workload}/{reference}")
    time_n = results.get(ranks, {}).get("epochs", {}).get(f"{workload}/{variant}")
    return base / time_n if base and time_n else None


def _plots(results: dict[int, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted(results)
    fig, axes = plt.subplots(2, len(WORKLOADS), figsize=(4 * len(WORKLOADS), 7), squeeze=False)
    for column, workload in enumerate(WORKLOADS):
        time_ax, speed_ax = axes[0][column], axes[1][column]
        for variant in VARIANTS:
            points = [(r, results[r]["epochs"].get(f"{workload}/{variant}")) for r in ranks]
            points = [(r, t * 1000) for r, t in points if t is not None]
            if points:
                time_ax.plot(*zip(*points), marker="o", label=variant)
            speeds = [(r, speedup(results, workload, variant, r)) for r in ranks]
            speeds = [(r, v) for r, v in speeds if v is not None]
            if speeds:
                speed_ax.plot(*zip(*speeds), marker="o", label=variant)
        speed_ax.plot(ranks, ranks, color="grey", linestyle=":", label="linear")
        time_ax.set(title=workload, xlabel="ranks", ylabel="ms / epoch", xticks=ranks)
        speed_ax.set(xlabel="ranks", ylabel="speed-up over 1 process", xticks=ranks)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "epoch_time.png", dpi=120)
    plt.close(fig)
    micro = results[ranks[-1]].get("allreduce")
    if micro:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, values in micro.items():
            ax.plot([int(k) for k in values], [v * 1e6 for v in values.values()], marker="o", label=key)
        ax.set(xscale="log", yscale="log", xlabel="KB", ylabel="µs per allreduce", title=f"{ranks[-1]} ranks")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "allreduce.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="scales each workload's timed epochs (after a warm-up)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--micro", action=argparse.BooleanOptionalAction, default=True, help="allreduce micro-benchmark"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = {r: launch(args, r, args.out) for r in args.ranks}
    write_atomically(args.out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    print(report(results, args.out))
    written = ", ".join(p.name for p in sorted(args.out.glob("*")) if p.name in _WRITTEN)
    print(f"benchmark of {', '.join(map(str, args.ranks))} rank(s): wrote {written} in {args.out}")


if __name__ == "__main__":
    main()
