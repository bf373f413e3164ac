"""Gradients at network speed: step time on the emulated 2-node cluster (tools/cluster/emulate.py), side by side.

    python -m tools.cluster.network_benchmark --out docs/network     # as root, ~15 minutes

Workload: the Transformer of ``lightning.pytorch.demos`` on synthetic tokens, sized so that its float32 gradients
are 31 MB (the link matters), one rank per node, one core and one torch thread per node. Variants, each run for
``--steps`` optimizer steps per round, round-robin over ``--rounds`` rounds after an untimed round (each round
starting one variant later), inside one MPI job per link speed and Open MPI allreduce algorithm (``--tunings``):

- ``compute``: MPIStrategy with no gradient communication (``sync="ensemble"``): the step's compute time;
- ``allreduce``: MPIStrategy's default (25 MiB buckets reduced after backward);
- ``allreduce_overlap``, ``allreduce_overlap_4``: ``overlap=True``, buckets of 16 MiB (its default) and 4 MiB
  reduced on a background thread while backward goes on;
- ``average_8``, ``average_32``: local SGD, parameters averaged every 8 / 32 steps;
- ``ddp_gloo``: Lightning's DDPStrategy over gloo on the same link (DDP overlaps too, 25 MiB buckets);
- ``ddp_mpi4py``: the same DDPStrategy over lightning-mpi's ``mpi4py`` process-group backend (DDP's buckets and its
  overlap with backward, the reductions over MPI);
- ``handwritten``: a plain PyTorch loop with one flat mpi4py ``Allreduce`` of the gradients per step.

Communication time: a raw in-place mpi4py ``Allreduce`` of the same bytes between the two nodes, median of
repeats. Reported per link speed and algorithm: the median step time of each variant (median over rounds of per-round
medians), bytes sent per step and rank, and the targets' ratios: allreduce / max(compute, communication) and
allreduce / DDP. ``--out`` gets ``results.json``, ``network.md`` and ``network.png`` (step time against link speed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = (
    "compute",
    "allreduce",
    "allreduce_overlap",
    "allreduce_overlap_4",
    "average_8",
    "average_32",
    "ddp_gloo",
    "ddp_mpi4py",
    "handwritten",
)
#: Open MPI's allreduce algorithms compared (MCA parameters of its ``coll/tuned`` component, given to mpirun):
#: its own choice by message size, and recursive doubling (one exchange of the whole buffer between 2 ranks).
TUNINGS = {
    "default": [],
    "recursive_doubling": [
        "--mca",
        "coll_tuned_use_dynamic_rules",
        "1",
        "--mca",
        "coll_tuned_allreduce_algorithm",
        "3",
    ],
}
WORKLOAD = {"vocab_size": 10_000, "ninp": 256, "nhead": 4, "nhid": 512, "nlayers": 2, "dropout": 0.0}
SEQUENCE, BATCH = 32, 8


# -- inside mpirun ---------------------------------------------------------------------------------------------


def _module() -> Any:
    import torch
    from lightning.pytorch import LightningModule
    from lightning.pytorch.demos import Transformer

    class TokenModel(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Transformer(**WORKLOAD)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            inputs, target = batch
            return torch.nn.functional.nll_loss(self.model(inputs, target), target.view(-1))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    return TokenModel()


def _tokens(steps: int, world: int) -> Any:
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1)
    n = steps * BATCH * world
    tokens = torch.randint(0, WORKLOAD["vocab_size"], (n, SEQUENCE + 1), generator=g)
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


class _StepTimer:
    """Seconds between consecutive training-batch ends (the first step is not counted)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def times(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.ends)]


_GROUPS_STARTED = [0]


def _default_group_for(variant: str) -> None:
    """Each variant on the process group it names: MPIStrategy starts an mpi4py group and a DDP variant reuses
    whatever group exists, so one of another backend is destroyed first (a new store port for each new group)."""
    import torch.distributed as dist

    wanted = {"ddp_gloo": "gloo", "ddp_mpi4py": "mpi4py"}.get(variant, "mpi4py")
    if dist.is_initialized() and dist.get_backend() != wanted:
        dist.destroy_process_group()
    if not dist.is_initialized():
        _GROUPS_STARTED[0] += 1
        os.environ["MASTER_PORT"] = str(29517 + _GROUPS_STARTED[0])


def _lightning_steps(variant: str, steps: int) -> tuple[list[float], float]:
    """Step times of one Lightning variant, and the bytes this rank sent per step (0 if unknown)."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy
    from mpi4py import MPI
    from torch.utils.data import DataLoader

    from lightning_mpi import MPIStrategy

    timer = _StepTimer()

    class Timing(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            timer.ends.append(time.perf_counter())

    world = MPI.COMM_WORLD.Get_size()
    strategies = {
        "compute": lambda: MPIStrategy(sync="ensemble", num_threads=1),
        "allreduce": lambda: MPIStrategy(num_threads=1),
        "allreduce_overlap": lambda: MPIStrategy(overlap=True, num_threads=1),
        "allreduce_overlap_4": lambda: MPIStrategy(overlap=True, bucket_mb=4, num_threads=1),
        "average_8": lambda: MPIStrategy(sync="average", every_n_steps=8, num_threads=1),
        "average_32": lambda: MPIStrategy(sync="average", every_n_steps=32, num_threads=1),
        "ddp_gloo": lambda: DDPStrategy(process_group_backend="gloo", cluster_environment=LightningEnvironment()),
        "ddp_mpi4py": lambda: DDPStrategy(process_group_backend="mpi4py", cluster_environment=LightningEnvironment()),
    }
    _default_group_for(variant)
    strategy = strategies[variant]()
    trainer = Trainer(
        accelerator="cpu",
        strategy=strategy,
        devices=1,
        num_nodes=world if variant.startswith("ddp_") else 1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timing()],
        num_sanity_val_steps=0,
        use_distributed_sampler=variant != "compute",
    )
    trainer.fit(_module(), DataLoader(_tokens(steps, world), batch_size=BATCH))
    sent = sum(getattr(strategy, "bytes_per_epoch", []) or [0]) / steps
    return timer.times(), sent


def _handwritten_steps(steps: int) -> tuple[list[float], float]:
    """The studies' way: a plain loop, one flat ``Allreduce`` of the gradients per step."""
    import torch
    from mpi4py import MPI
    from torch.utils.data import DataLoader

    comm = MPI.COMM_WORLD
    module = _module()
    optimizer = module.configure_optimizers()
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params))
    data = _tokens(steps, comm.Get_size())
    shard = torch.utils.data.Subset(data, range(comm.Get_rank(), len(data), comm.Get_size()))
    ends = []
    for inputs, target in DataLoader(shard, batch_size=BATCH):
        loss = torch.nn.functional.nll_loss(module.model(inputs, target), target.view(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.cat([p.grad.reshape(-1) for p in params], out=flat)
        comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
        flat.div_(comm.Get_size())
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        optimizer.step()
        ends.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(ends)], flat.numel() * 4.0


def _communication_seconds(nbytes: int, repeats: int) -> float:
    """Median seconds of a raw in-place float32 ``Allreduce`` of ``nbytes`` between the ranks."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    buffer = np.ones(nbytes // 4, dtype=np.float32)
    times = []
    for _ in range(repeats + 1):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def worker(args: argparse.Namespace) -> None:
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    # Lightning's DDP (one device per node) reads its ranks and rendezvous from these (rank 0's address on the
    # cluster's subnet).
    address = comm.bcast(os.environ.get("LIGHTNING_MPI_NODE_ADDRESS", "127.0.0.1"), root=0)
    os.environ.update(
        MASTER_ADDR=address,
        MASTER_PORT="29517",
        WORLD_SIZE=str(world),
        NODE_RANK=str(rank),
        LOCAL_RANK="0",
        RANK=str(rank),
    )
    gradient_bytes = sum(p.numel() for p in _module().parameters()) * 4
    rounds: dict[str, list[float]] = {v: [] for v in args.variants}
    sent: dict[str, float] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (imports, allocations, the gloo group)
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for variant in order:
            times, nbytes = (
                _handwritten_steps(args.steps) if variant == "handwritten" else _lightning_steps(variant, args.steps)
            )
            longest = max(comm.allgather(statistics.median(times)))  # a step takes as long as its slowest rank
            if r > 0:
                rounds[variant].append(longest)
                sent[variant] = nbytes
    communication = _communication_seconds(gradient_bytes, args.repeats)
    if rank == 0:
        result = {
            "rate": args.rate,
            "world": world,
            "gradient_bytes": gradient_bytes,
            "communication_s": communication,
            "step_s": {v: statistics.median(t) for v, t in rounds.items()},
            "rounds_s": rounds,
            "bytes_per_step": sent,
        }
        Path(args.result).write_text(json.dumps(result, indent=2))


# -- the driver ----------------------------------------------------------------------------------------------------


def drive(args: argparse.Namespace) -> None:
    from lightning_mpi.files import write_json
    from tools.cluster.emulate import EmulatedCluster, unavailable

    if (reason := unavailable()) is not None:
        raise SystemExit(f"cannot emulate a cluster here: {reason}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with EmulatedCluster(nodes=2, rate=args.rates[0]) as cluster:
        for tuning in args.tunings:
            for rate in args.rates:
                cluster.set_rate(rate)
                result_file = cluster.state / f"network-{tuning}-{rate}.json"
                argv = [
                    "-m",
                    "tools.cluster.network_benchmark",
                    "--worker",
                    "--rate",
                    rate,
                    "--result",
                    str(result_file),
                    "--rounds",
                    str(args.rounds),
                    "--steps",
                    str(args.steps),
                    "--repeats",
                    str(args.repeats),
                    "--variants",
                    *args.variants,
                ]
                env = {"LIGHTNING_MPI_NODE_ADDRESS": cluster.nodes[0].address, "GLOO_SOCKET_IFNAME": "eth0"}
                started = time.perf_counter()
                done = cluster.mpirun(
                    argv,
                    per_node=1,
                    mpirun_args=TUNINGS[tuning],
                    timeout=args.timeout,
                    env=env,
                    forward=("PYTHONPATH", "PYTHONUNBUFFERED", "LIGHTNING_MPI_NODE_ADDRESS", "GLOO_SOCKET_IFNAME"),
                )
                if done.returncode != 0:
                    raise SystemExit(f"the {tuning} {rate} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
                result = json.loads(result_file.read_text())
                result.update(tuning=tuning, wall_s=time.perf_counter() - started)
                results.append(result)
                print(_summary(result), flush=True)
    write_json(out / "results.json", {"workload": WORKLOAD, "sequence": SEQUENCE, "batch": BATCH, "runs": results})
    print(report(out))
    print(f"wrote results.json, network.md and network.png in {out}")


def _label(result: dict[str, Any]) -> str:
    return f"{result['rate']}, {result['tuning'].replace('_', ' ')}"


def _summary(result: dict[str, Any]) -> str:
    parts = [f"{_label(result)}: raw Allreduce {result['communication_s'] * 1e3:.0f} ms"]
    parts += [f"{v} {s * 1e3:.0f} ms" for v, s in result["step_s"].items()]
    return ", ".join(parts)


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The issue's targets: allreduce / max(compute, communication) and allreduce / DDP over gloo (the default
    allreduce and the overlapped one)."""
    step, out = result["step_s"], {}
    for variant in ("allreduce", "allreduce_overlap"):
        if variant in step and "compute" in step:
            out[f"{variant} / max(compute, raw Allreduce)"] = step[variant] / max(
                step["compute"], result["communication_s"]
            )
        if variant in step and "ddp_gloo" in step:
            out[f"{variant} / DDP"] = step[variant] / step["ddp_gloo"]
    return out


def report(out: Path) -> str:
    """``network.md`` and ``network.png`` from ``results.json``; returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_mpi.files import save_figure, write_atomically

    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    variants = [v for v in VARIANTS if all(v in r["step_s"] for r in runs)]
    lines = [
        "| step time (ms, median) | " + " | ".join(_label(r) for r in runs) + " | MiB sent per step and rank |",
        "|---|" + "---:|" * (len(runs) + 1),
    ]
    for v in variants:
        sent = (
            runs[0]["bytes_per_step"].get(v, 0) / 2**20
            if not v.startswith("ddp_")
            else runs[0]["gradient_bytes"] / 2**20
        )
        cells = [f"{r['step_s'][v] * 1e3:.0f}" for r in runs]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {sent:.1f} |")
    lines.append(
        "| raw Allreduce of the gradients | "
        + " | ".join(f"{r['communication_s'] * 1e3:.0f}" for r in runs)
        + f" | {runs[0]['gradient_bytes'] / 2**20:.1f} |"
    )
    lines.append("")
    for r in runs:
        parts = ", ".join(f"{k} **{v:.2f}**" for k, v in ratios(r).items())
        lines.append(f"- {_label(r)}: {parts}")
    text = "\n".join(lines) + "\n"
    write_atomically(out / "network.md", lambda tmp: tmp.write_text(text))

    tunings = list(dict.fromkeys(r["tuning"] for r in runs))
    fig, axes = plt.subplots(1, len(tunings), figsize=(6.2 * len(tunings), 4.4), sharey=True, squeeze=False)
    top = max(max(r["step_s"].values()) for r in runs) * 1e3 * 1.08
    for ax, tuning in zip(axes[0], tunings):
        mine = [r for r in runs if r["tuning"] == tuning]
        speeds = [r["rate"] for r in mine]
        for v in variants:
            ax.plot(speeds, [r["step_s"][v] * 1e3 for r in mine], marker="o", label=v)
        ax.plot(
            speeds,
            [r["communication_s"] * 1e3 for r in mine],
            linestyle=":",
            color="black",
            label="raw Allreduce of the gradients",
        )
        ax.set_xlabel("link speed (each way, per node)")
        ax.set_title(f"Open MPI allreduce: {tuning.replace('_', ' ')}")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("step time (ms, median)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(
        f"2 emulated nodes (1 core each), {runs[0]['gradient_bytes'] / 2**20:.0f} MiB of float32 gradients per step"
    )
    fig.tight_layout()
    save_figure(fig, out / "network.png")
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10, help="raw Allreduce repeats")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--tunings", nargs="+", default=list(TUNINGS), choices=list(TUNINGS))
    parser.add_argument("--out", default="docs/network")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--report-only", action="store_true", help="re-render network.md/png from results.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
    elif args.report_only:
        print(report(Path(args.out)))
    else:
        drive(args)


if __name__ == "__main__":
    sys.exit(main())
