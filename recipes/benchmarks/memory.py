"""Memory per rank against the number of ranks: peak resident memory of rank 0 and of a typical rank, and the bytes
a checkpoint writes, for every mode, at 2, 4, 8 and 16 ranks (oversubscribed on one machine).

    python -m recipes.benchmarks.memory --ranks 2 4 8 16 --out docs/memory

Each launch trains an MLP of 8.4M parameters with Adam for 2 steps of batch 32 per rank, then saves a checkpoint
(``trainer.save_checkpoint``) and tests once; every rank reports its peak RSS (``ru_maxrss``). Results:
``results.json``, ``table.md`` and ``memory.png`` in ``--out``. Launches ``mpirun`` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {"allreduce": {}, "average": {"every_n_steps": 1}, "ensemble": {"voting": "soft"}}
WIDTH = 2048  # 784 -> 2048 -> 2048 -> 2048 -> 10: 8.4M parameters


def rank_main(out: Path, mode: str) -> None:
    """One launch: train, save, test; every rank writes its peak RSS and rank 0 the bytes written."""
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mpi import MPIStrategy

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(784, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH),
                nn.ReLU(), nn.Linear(WIDTH, 10),
            )  # fmt: skip

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    L.seed_everything(0)
    data = TensorDataset(torch.randn(2048, 784), torch.randint(0, 10, (2048,)))
    trainer = L.Trainer(strategy=MPIStrategy(mode, **MODES[mode]), accelerator="cpu", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)  # fmt: skip
    model = MLP()
    trainer.fit(model, DataLoader(data, batch_size=32))
    path = out / f"{mode}-{trainer.world_size}.ckpt"
    trainer.save_checkpoint(path)
    trainer.test(model, DataLoader(data, batch_size=256), verbose=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    peaks = trainer.strategy.comm.allgather_object(peak_mb)  # a few numbers, for the report only
    if trainer.is_global_zero:
        written = sum(f.stat().st_size for f in out.glob(f"{mode}-{trainer.world_size}.ckpt*") if f.is_file())
        written += sum(f.stat().st_size for f in out.glob(f"{mode}-{trainer.world_size}.ckpt.ranks-*/*"))
        import lightning_mpi

        record = {"mode": mode, "ranks": trainer.world_size, "peak_mb": peaks, "checkpoint_bytes": written,
                  "lightning_mpi": lightning_mpi.__file__}  # fmt: skip
        (out / f"{mode}-{trainer.world_size}.json").write_text(json.dumps(record))


def launch(ranks: int, mode: str, out: Path, code: Path | None = None) -> dict:
    from tools.mpirun import launcher, mpi_env

    mpirun, flavour = launcher()
    extra = ["--oversubscribe"] if flavour == "openmpi" else []
    cmd = [
        mpirun,
        "-n",
        str(ranks),
        *extra,
        sys.executable,
        "-m",
        "recipes.benchmarks.memory",
        "--rank-stage",
        mode,
        "--out",
        str(out),
    ]
    env = mpi_env({"OMP_NUM_THREADS": "1"})
    if code is not None:  # another checkout of lightning_mpi (e.g. a git worktree of an earlier commit)
        env["PYTHONPATH"] = os.pathsep.join([str(code), env["PYTHONPATH"]])
    subprocess.run(cmd, check=True, timeout=1200, env=env)
    return json.loads((out / f"{mode}-{ranks}.json").read_text())


def table(records: list[dict], machine: str) -> str:
    lines = [
        f"Peak resident memory per rank (MB) and checkpoint bytes, {machine}; MLP of 8.4M parameters with Adam.",
        "",
        "| mode | ranks | rank 0 peak (MB) | median rank peak (MB) | rank 0 vs 2 ranks | checkpoint (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = {r["mode"]: r["peak_mb"][0] for r in records if r["ranks"] == min(x["ranks"] for x in records)}
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['ranks']} | {r['peak_mb'][0]:,.0f} | {statistics.median(r['peak_mb']):,.0f} | "
            f"{r['peak_mb'][0] / base[r['mode']]:.2f}x | {r['checkpoint_bytes'] / 2**20:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in records):
        rows = [r for r in records if r["mode"] == mode]
        ranks = [r["ranks"] for r in rows]
        left.plot(ranks, [r["peak_mb"][0] for r in rows], marker="o", label=mode)
        right.plot(ranks, [r["checkpoint_bytes"] / 2**20 for r in rows], marker="o", label=mode)
    left.set(xscale="log", xlabel="ranks", ylabel="rank 0 peak RSS (MB)", title="Memory of rank 0")
    right.set(xscale="log", xlabel="ranks", ylabel="MB written", title="Checkpoint bytes (all files)")
    for axes in (left, right):
        axes.set_xticks(ranks, [str(r) for r in ranks])
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--out", type=Path, default=Path("docs/memory"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--code", type=Path, help="measure the lightning_mpi of this directory (a worktree) instead")
    parser.add_argument("--rank-stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_stage:
        rank_main(args.out, args.rank_stage)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.perf_counter()
    for ranks in args.ranks:
        for mode in args.modes:
            records.append(launch(ranks, mode, args.out, args.code))
            print(json.dumps(records[-1]), flush=True)
    for leftover in args.out.glob("*.ckpt*"):  # the checkpoints were only measured
        subprocess.run(["rm", "-rf", str(leftover)], check=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} (ranks oversubscribed)"
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "records": records}, indent=2))
    (args.out / "table.md").write_text(table(records, machine))
    plot(records, args.out / "memory.png")
    print(f"{len(records)} launches in {time.perf_counter() - started:.0f} s: {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
