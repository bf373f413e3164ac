"""The communication module: real ranks for the MPI path, the single-process twin without MPI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_mpi.comm import Communicator, launched_by_mpi
from tests.mpirun import ROOT


@pytest.mark.mpi
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_on_real_ranks(world, suite_launches):
    # every rank asserted every collective's results itself (tests/scenarios/collectives.py), then saved its word
    assert [r["ok"] for r in suite_launches(world).results("collectives")] == [True] * world


def test_import_does_not_initialise_mpi():
    code = "import sys, lightning_mpi; assert 'mpi4py.MPI' not in sys.modules, 'MPI initialised at import'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_single_process_twin_is_identity():
    assert not launched_by_mpi()
    comm = Communicator()
    t = torch.arange(4.0)
    assert comm.allreduce_(t, "mean") is t
    assert torch.equal(t, torch.arange(4.0))
    assert comm.prepared_allreduce(t, "sum")() is t
    assert torch.equal(t, torch.arange(4.0))
    assert [x.tolist() for x in comm.allgather(t)] == [[0.0, 1.0, 2.0, 3.0]]
    assert comm.broadcast_object("x") == "x"
    assert comm.gather_object(3) == [3]
    with pytest.raises(TypeError, match="truncate"):
        comm.allreduce_(torch.ones(2, dtype=torch.int64), "mean")
    with pytest.raises(ValueError, match="Unknown reduction"):
        comm.allreduce_(t, "avg")
