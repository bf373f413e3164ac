"""MPIStrategy's part of a checkpoint: the only code that reads or writes the ``"lightning_mpi"`` section.

Files are written once (rank 0) and atomically. The section (absent when there is nothing beyond Lightning's own
checkpoint, as under gradient allreduce) holds::

    {"format": FORMAT_VERSION, "sync": "average", "world_size": 2, "policy": {...the policy's state_dict...},
     "ranks": [{"state_dict": ..., "optimizer_states": [...]}, ...]}   # where ranks hold different states

Files written before the format had a number carry no ``"format"`` and have the layout of version 1.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module

from lightning_mpi.comm import Communicator

if TYPE_CHECKING:
    from lightning_mpi.policies import SyncPolicy

#: The layout of the ``"lightning_mpi"`` section this version writes; it reads this one and every older one.
FORMAT_VERSION = 1
SECTION = "lightning_mpi"


def strategy_state(
    policy: SyncPolicy, comm: Communicator, module: Module, optimizer_states: list[dict[str, Any]]
) -> dict[str, Any]:
    """What MPIStrategy adds to a checkpoint under ``"lightning_mpi"`` (collective: call on every rank).

    Policies whose ranks hold different models or optimizer state (averaging between averagings, ensembles)
    also store every rank's own model and optimizer state under ``"ranks"``, so a resumed job continues exactly
    where each rank was; the checkpoint's ordinary ``state_dict`` stays the averaged model (or member 0).
    """
    policy_state = policy.state_dict()
    if not (policy.ranks_differ or policy_state):
        return {}  # nothing beyond Lightning's own checkpoint (gradient allreduce: the same file as DDP's)
    state: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "sync": policy.name,
        "world_size": comm.size,
        "policy": policy_state,
    }
    if policy.ranks_differ:
        own = {"state_dict": policy.rank_state_dict(module), "optimizer_states": optimizer_states}
        state["ranks"] = comm.gather_object(own, root=0)
    return state


def checkpoint_section(checkpoint: dict[str, Any], path: Any = None) -> dict[str, Any]:
    """The ``"lightning_mpi"`` section of a loaded checkpoint (empty if it has none); a ``ValueError`` if a newer
    version of lightning-mpi wrote it in a layout this one does not know."""
    section: dict[str, Any] = checkpoint.get(SECTION) or {}
    version = section.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path or 'This checkpoint'} has lightning-mpi checkpoint format {version!r}, newer than the format "
            f"{FORMAT_VERSION} this version reads: upgrade lightning-mpi to load it."
        )
    return section


def restore(
    checkpoint: dict[str, Any], policy: SyncPolicy, rank: int, world_size: int, fitting: bool, path: Any = None
) -> None:
    """Give ``policy`` its stored state and, where it continues from each rank's own state, put this rank's model
    and optimizer state where Lightning loads from (on every rank)."""
    section = checkpoint_section(checkpoint, path)
    if section.get("sync") == "ensemble" and policy.name != "ensemble":
        rank_zero_warn(
            f"{path} is an ensemble checkpoint of {len(section.get('ranks', []))} member(s), loaded under "
            f"MPIStrategy(sync={policy.name!r}): the model is member 0 alone. Evaluate the ensemble with "
            "MPIStrategy(sync='ensemble') (any world size) or lightning_mpi.load_ensemble(path, MyModule)."
        )
    policy.load_state_dict(section.get("policy", {}))
    ranks = section.get("ranks")
    if ranks is None or not policy.restores_rank_states(fitting):
        return
    if len(ranks) != world_size:
        hint = (
            " (An ensemble checkpoint also loads in one process with load_ensemble().)"
            if (section.get("sync") == "ensemble")
            else ""
        )
        raise ValueError(
            f"{path or 'This checkpoint'} holds the state of {len(ranks)} ranks but the job runs {world_size}: resume "
            f"it with mpirun -n {len(ranks)}.{hint}"
        )
    checkpoint["state_dict"] = ranks[rank]["state_dict"]
    checkpoint["optimizer_states"] = ranks[rank]["optimizer_states"]


def save(
    io: CheckpointIO,
    checkpoint: dict[str, Any],
    filepath: Any,
    storage_options: Any = None,
    section: dict[str, Any] | None = None,
) -> None:
    """Save ``checkpoint`` with ``section`` (from :func:`strategy_state`; none if empty) through ``io`` at
    ``filepath`` (the path as given: every plugin writes where it is told). ``checkpoint`` itself is not changed:
    callbacks' ``on_save_checkpoint`` saw the dict they were given.

    Lightning's default IO writes a local file atomically: into a temporary file that an fsspec transaction moves
    into place. Its temporary file is made in the checkpoint's own directory here, so that the move is a rename (a
    move from another filesystem, such as a node-local ``/tmp``, is a copy that a crash can cut short).
    """
    if section:
        checkpoint = {**checkpoint, SECTION: section}
    path = os.fspath(filepath)
    if type(io) is TorchCheckpointIO and "://" not in path:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with _temporary_files_in(directory):
            io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
    else:
        io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)


#: How the default IO's temporary file in a checkpoint's directory is named while it is written.
PARTIAL_PREFIX = ".partial-checkpoint-"


@contextmanager
def _temporary_files_in(directory: str) -> Iterator[None]:
    """fsspec's temporary file in ``directory``, under a name that says what it is. One that a killed job left
    behind (an interruption that unwinds removes its own) is removed by the next save into the directory."""
    remove_partial_checkpoints(directory)
    previous = tempfile.tempdir, tempfile.template
    tempfile.tempdir, tempfile.template = directory, PARTIAL_PREFIX
    try:
        yield
    finally:
        tempfile.tempdir, tempfile.template = previous


def remove_partial_checkpoints(directory: str) -> list[str]:
    """Remove what interrupted saves left in ``directory`` (files named ``.partial-checkpoint-*``); their names."""
    removed = []
    for entry in os.scandir(directory):
        if entry.name.startswith(PARTIAL_PREFIX) and entry.is_file():
            os.remove(entry.path)
            removed.append(entry.name)
    return removed
