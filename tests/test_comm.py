"""The communication module in one process: MPI stays unloaded, the single-process twin (real ranks:
tests/mpi/test_collectives.py; thread ranks: tests/test_policies_threaded.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_mpi.comm import Communicator, launched_by_mpi
from tests.mpirun import ROOT


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
