"""What the launcher's variables say, on one process: the world size before fit under ``srun --mpi=pmix``, and
launches whose processes do not form one MPI world (``srun -n 2`` without an MPI plugin) stopped before training.

The variables are those Slurm 22.05, Open MPI 5 and MPICH set (read from real launches, see tests/mpi/test_slurm.py).
"""

from __future__ import annotations

import os
import pickle
import sys

import pytest
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lightning_mpi import MPIStrategy
from lightning_mpi.checks import check_launcher_agrees
from lightning_mpi.comm import launched_by_mpi, launcher_rank, launcher_size, launcher_tasks
from lightning_mpi.hydra import _check_argv, _RegisterResolvers, check_sweep_plugins, mpi_hydra_main
from tests.helpers import BATCH, Regressor, quiet_trainer, regression_data

JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2"}
BATCH_STEP = {**JOB, "SLURM_PROCID": "0"}  # the batch script and the salloc shell: no step task count
SRUN_NONE = {**JOB, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
SRUN_PMI2 = {
    **SRUN_NONE,
    "SLURM_MPI_TYPE": "pmi2",
    "PMI_RANK": "1",
    "PMI_SIZE": "2",
    "PMI_FD": "11",
    "PMI_JOBID": "7.0",
}
SRUN_PMIX = {**SRUN_NONE, "SLURM_MPI_TYPE": "pmix", "PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.7.0"}
# mpirun / mpiexec inside an allocation: their daemons run as a one-task srun step, which the ranks inherit
MPIRUN_IN_JOB = {
    **JOB,
    "SLURM_STEP_NUM_TASKS": "1",
    "SLURM_PROCID": "0",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_RANK": "1",
    "PMIX_RANK": "1",
    "PMIX_NAMESPACE": "prterun-vm-22944@1",
}
MPIEXEC_IN_JOB = {
    **JOB,
    "SLURM_STEP_NUM_TASKS": "1",
    "SLURM_PROCID": "0",
    "PMI_SIZE": "2",
    "PMI_RANK": "1",
    "MPI_LOCALNRANKS": "2",
}
# another PMIx launcher (no size variable) started inside a 4-task srun step: nothing says how many it started
PMIX_IN_STEP = {**JOB, "SLURM_STEP_NUM_TASKS": "4", "PMIX_RANK": "0", "PMIX_NAMESPACE": "prterun-x@1"}
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "PALS_", "SUBMITIT_")


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch):
    """Replace this process's launcher variables by the given ones."""
    for name in list(os.environ):
        if name.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(name)

    def use(variables: dict[str, str]) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return use


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, None),
        (BATCH_STEP, None),
        (SRUN_NONE, (2, "SLURM_STEP_NUM_TASKS")),
        (SRUN_PMI2, (2, "PMI_SIZE")),
        (SRUN_PMIX, (2, "SLURM_STEP_NUM_TASKS")),
        (MPIRUN_IN_JOB, (2, "OMPI_COMM_WORLD_SIZE")),
        (MPIEXEC_IN_JOB, (2, "PMI_SIZE")),
        (PMIX_IN_STEP, None),
    ],
    ids=[
        "no-launcher",
        "batch-step",
        "srun",
        "srun-pmi2",
        "srun-pmix",
        "mpirun-in-job",
        "mpiexec-in-job",
        "other-pmix-in-step",
    ],
)
def test_launcher_tasks(launched, variables, expected):
    launched(variables)
    assert launcher_tasks() == expected


def test_srun_pmix_gives_the_world_size_before_fit_without_mpi(launched):
    launched(SRUN_PMIX)
    assert launched_by_mpi()
    assert (launcher_size(), launcher_rank()) == (2, 1)
    trainer = quiet_trainer(strategy=MPIStrategy(), max_steps=1)
    assert (trainer.world_size, trainer.global_rank) == (2, 1)


def test_mpirun_in_an_allocation_ignores_the_daemon_step(launched):
    launched(MPIRUN_IN_JOB)
    assert (launcher_size(), launcher_rank()) == (2, 1)
    check_launcher_agrees(mpi_size=2)


@pytest.mark.parametrize(
    "variables",
    [{}, BATCH_STEP, PMIX_IN_STEP, {**SRUN_NONE, "SLURM_STEP_NUM_TASKS": "1"}],
    ids=["no-launcher", "batch-step", "other-pmix-in-step", "srun-n-1"],
)
def test_nothing_to_disagree_with(launched, variables):
    launched(variables)
    check_launcher_agrees(mpi_size=1)


def test_srun_without_mpi_plugin_is_refused_with_the_fix(launched):
    launched(SRUN_NONE)
    with pytest.raises(RuntimeError) as error:
        check_launcher_agrees(mpi_size=1)
    message = str(error.value)
    assert "started 2 processes (SLURM_STEP_NUM_TASKS=2) but they do not form one MPI world" in message
    assert "without an MPI plugin" in message
    for fix in ("--mpi=pmix", "Open MPI", "--mpi=pmi2", "MPICH", "SLURM_MPI_TYPE", "srun --mpi=list"):
        assert fix in message


def test_a_plugin_the_mpi_cannot_use_is_named(launched):
    launched(SRUN_PMI2)
    with pytest.raises(RuntimeError, match="srun's MPI plugin 'pmi2' does not fit"):
        check_launcher_agrees(mpi_size=1)


def test_mpirun_of_another_mpi_is_refused(launched):
    launched({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    with pytest.raises(RuntimeError, match="different MPI implementations") as error:
        check_launcher_agrees(mpi_size=1)
    assert "srun" not in str(error.value)


def test_fit_stops_before_training(launched):
    launched(SRUN_NONE)
    model = Regressor()
    steps = []
    model.on_train_batch_start = lambda *args: steps.append(args)
    trainer = quiet_trainer(strategy=MPIStrategy(), max_steps=2)
    with pytest.raises(RuntimeError, match="do not form one MPI world"):
        trainer.fit(model, DataLoader(regression_data(4 * BATCH), batch_size=BATCH))
    assert steps == []


def test_hydra_app_stops_before_writing_anything(launched, monkeypatch, tmp_path):
    launched(SRUN_NONE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["app.py", f"hydra.run.dir={tmp_path / 'run'}"])
    ran = []
    app = mpi_hydra_main(config_path=None, config_name=None)(ran.append)
    with pytest.raises(SystemExit, match="do not form one MPI world"):
        app()
    assert ran == []
    assert list(tmp_path.iterdir()) == []


SUBMITIT = OmegaConf.create(
    {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
        "launcher": {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"},
    }
)


def test_submitit_jobs_are_accepted_under_srun(launched):
    launched({**SRUN_PMIX, "SUBMITIT_EXECUTOR": "slurm"})
    check_sweep_plugins(SUBMITIT)  # a task of a job the one sweep process submitted


def test_submitit_launcher_is_refused_where_every_rank_would_sweep(launched):
    launched(MPIRUN_IN_JOB)
    with pytest.raises(RuntimeError, match="SlurmLauncher is not supported under mpirun"):
        check_sweep_plugins(SUBMITIT)
    with pytest.raises(SystemExit, match="every rank would submit every job"):
        _check_argv(["-m", "hydra/launcher=submitit_slurm"])


def test_resolvers_are_registered_where_the_task_is_unpickled():
    OmegaConf.clear_resolver("mpi_stamp")
    assert not OmegaConf.has_resolver("mpi_stamp")
    pickle.loads(pickle.dumps(_RegisterResolvers()))
    assert OmegaConf.has_resolver("mpi_stamp")
    assert OmegaConf.has_resolver("mpi_rank_zero_only")
