"""What the MPI launcher tells a process through its environment, read without initialising MPI."""

from __future__ import annotations

import os
import sys

#: Environment variables set by the MPI launchers we know (Open MPI, MPICH/Hydra, Intel MPI, PMIx, srun --mpi).
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "PALS_RANKID")
# Where MPI launchers announce how many ranks they started (Open MPI; MPICH/Hydra, Intel MPI and srun --mpi=pmi2;
# Cray PALS). Slurm's PMIx server announces none: see _slurm_pmix_step_tasks.
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PALS_SIZE")
# The PMIx namespace Slurm gives the tasks of a step started by srun --mpi=pmix ("slurm.pmix.<job>.<step>").
_SLURM_PMIX_NAMESPACE = "slurm.pmix."
#: Seconds a rank waits between writing why it aborts and calling MPI_Abort, for the launcher to forward the text.


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpirun, mpiexec, srun with an MPI plugin) started this process."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def _launcher_value(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launcher_rank() -> int:
    """This process's rank as the launcher announced it, read without initialising MPI (0 if none did)."""
    return _launcher_value(("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "PALS_RANKID"), 0)


def launcher_size() -> int:
    """The number of ranks the launcher started, read without initialising MPI (1 if none did).

    ``srun --mpi=pmix`` sets ``PMIX_RANK`` but no size variable: there the size is the step's task count.
    """
    return _launcher_value(_SIZE_VARIABLES, 0) or _slurm_pmix_step_tasks() or 1


def _slurm_pmix_step_tasks() -> int | None:
    if os.environ.get("PMIX_NAMESPACE", "").startswith(_SLURM_PMIX_NAMESPACE) and "SLURM_STEP_NUM_TASKS" in os.environ:
        return int(os.environ["SLURM_STEP_NUM_TASKS"])
    return None


def launcher_tasks() -> tuple[int, str] | None:
    """How many processes the launcher started together with this one, and the variable that says so.

    Unlike :func:`launcher_size`, this also counts a Slurm step started without MPI wiring (``srun -n 2`` where the
    site's default is ``--mpi=none``): each of its processes is an MPI world of one. ``None`` where nothing says:
    no launcher, the batch step of an ``sbatch`` script or an ``salloc`` shell (they set no step task count), or a
    PMIx launcher other than Slurm (it sets no size either).

    The MPI launchers' own variables come first: ``mpirun`` inside a Slurm allocation starts its daemons with
    ``srun``, one task per node, so its ranks also inherit that step's ``SLURM_STEP_NUM_TASKS``.
    """
    for name in _SIZE_VARIABLES:
        if name in os.environ:
            return int(os.environ[name]), name
    if "PMIX_RANK" in os.environ and _slurm_pmix_step_tasks() is None:
        return None
    if "SLURM_STEP_NUM_TASKS" in os.environ:
        return int(os.environ["SLURM_STEP_NUM_TASKS"]), "SLURM_STEP_NUM_TASKS"
    return None


def mpi_world_size() -> int:
    """The number of ranks in ``MPI_COMM_WORLD``; 1 while MPI is not initialised (this process is alone then).

    Never initialises MPI.
    """
    mod = sys.modules.get("mpi4py.MPI")
    if mod is None or not mod.Is_initialized() or mod.Is_finalized():
        return 1
    return int(mod.COMM_WORLD.Get_size())


def mpi_library() -> str | None:
    """The loaded MPI library in a few words, e.g. ``"Open MPI v5.0.11"`` or ``"MPICH Version: 4.3.0"`` (``None`` if
    mpi4py has not loaded one). Never initialises MPI."""
    mod = sys.modules.get("mpi4py.MPI")
    if mod is None:
        return None
    first = mod.Get_library_version().replace("\0", "").strip().split("\n")[0].split(",")[0]
    return " ".join(first.split()) or None
