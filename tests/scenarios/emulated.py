"""Under mpirun on the emulated cluster (tests/test_emulated_cluster.py): what each rank sees of its node, and the
multi-rank scenarios across nodes.

    python -m tests.scenarios.emulated main OUT     # 1 rank per node: node view, equivalence cases, SIGTERM
    python -m tests.scenarios.emulated ranks OUT    # any layout: node view, a Trainer told num_nodes and devices
    python -m tests.scenarios.emulated slow OUT     # trains slowly until the test kills a rank
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.comm import world
from lightning_mpi.threads import choose_threads
from tests.helpers import BATCH, Regressor, quiet_trainer, regression_data
from tests.scenarios import equivalence, evaluation

#: bytes of float32 each rank allreduces in `ranks` (their traffic shows on the links' byte counters)
ALLREDUCE_BYTES = 8 * 2**20
#: rank 0 writes this file into OUT once `slow` is training; every rank writes its pid to pid.rank<r>
MARKER = "training"


def node_view(out: Path, name: str, **trainer_kwargs) -> None:
    """Fit one step (the strategy chooses the threads), then record what the rank knows of its node and Lightning's
    view of the launch (``trainer_kwargs``: e.g. ``num_nodes``, ``devices``, which the strategy checks)."""
    from mpi4py import MPI

    trainer = quiet_trainer(strategy=MPIStrategy(), max_steps=1, **trainer_kwargs)
    trainer.fit(Regressor(), DataLoader(regression_data(8 * BATCH), batch_size=BATCH))
    comm = world()
    data = np.full(ALLREDUCE_BYTES // 4, comm.rank, dtype=np.float32)
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, data)
    # a gloo group across the nodes: it meets its peers through the store rank 0 serves (lightning_mpi.distributed)
    gloo = torch.distributed.new_group(backend="gloo")
    ranks_sum = torch.tensor([float(comm.rank)])
    torch.distributed.all_reduce(ranks_sum, group=gloo)
    torch.distributed.destroy_process_group(gloo)
    record = {
        "world": comm.size,
        "rank": comm.rank,
        "local_rank": comm.local_rank,
        "local_size": comm.local_size,
        "node_rank": comm.node_rank,
        "num_nodes": comm.num_nodes,
        "trainer": {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
        },
        "processor": MPI.Get_processor_name(),
        "hostname": socket.gethostname(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "thread_reason": choose_threads(None, comm.local_size).reason,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "allreduce_ok": bool((data == sum(range(comm.size))).all()),
        "gloo_sum": ranks_sum.item(),
    }
    (out / f"{name}.rank{comm.rank}.json").write_text(json.dumps(record))


def main(out: Path) -> None:
    node_view(out, "main")
    equivalence.main(out)
    evaluation.sigterm(out)


def ranks(out: Path) -> None:
    comm = world()
    node_view(out, "ranks", num_nodes=comm.num_nodes, devices=comm.local_size)


class Slow(Regressor):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 0 and batch_idx == 5:
            (self.out / MARKER).touch()
        time.sleep(0.05)
        return super().training_step(batch, batch_idx)


def slow(out: Path) -> None:
    """Train for a long time (bounded: 2000 steps); the test kills one rank meanwhile."""
    comm = world()
    (out / f"pid.rank{comm.rank}").write_text(f"{os.getpid()} {socket.gethostname()}")
    model = Slow()
    model.out = out
    trainer = quiet_trainer(strategy=MPIStrategy(), max_steps=2000)
    trainer.fit(model, DataLoader(regression_data(2000 * BATCH * comm.size), batch_size=BATCH))
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    {"main": main, "ranks": ranks, "slow": slow}[sys.argv[1]](Path(sys.argv[2]))
