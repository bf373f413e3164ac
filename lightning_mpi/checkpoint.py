"""Checkpoint files of MPIStrategy: written once and atomically; ensembles keep every member."""

from __future__ import annotations

import os
import tempfile
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor
from torch.nn import Module

from lightning_mpi.comm import Communicator
from lightning_mpi.sync import SyncPolicy, combiner


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
    state: dict[str, Any] = {"sync": policy.name, "world_size": comm.size, "policy": policy_state}
    if policy.ranks_differ:
        own = {"state_dict": policy.rank_state_dict(module), "optimizer_states": optimizer_states}
        state["ranks"] = comm.gather_object(own, root=0)
    return state


def restore_rank_state(checkpoint: dict[str, Any], rank: int, world_size: int) -> None:
    """Put this rank's own model and optimizer state (if the checkpoint has them) where Lightning loads from."""
    ranks = checkpoint.get("lightning_mpi", {}).get("ranks")
    if ranks is None:
        return
    if len(ranks) != world_size:
        raise ValueError(
            f"This checkpoint holds the state of {len(ranks)} ranks but the job runs {world_size}: resume it with "
            f"mpirun -n {len(ranks)}. (An ensemble checkpoint also loads in one process with load_ensemble().)"
        )
    checkpoint["state_dict"] = ranks[rank]["state_dict"]
    checkpoint["optimizer_states"] = ranks[rank]["optimizer_states"]


def save(io: CheckpointIO, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
    """Save ``checkpoint`` through ``io`` at ``filepath`` (the path as given: every plugin writes where it is told).

    Lightning's default IO writes a local file atomically: into a temporary file that an fsspec transaction moves
    into place. Its temporary file is made in the checkpoint's own directory here, so that the move is a rename (a
    move from another filesystem, such as a node-local ``/tmp``, is a copy that a crash can cut short).
    """
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


class EnsembleModel(Module):
    """The members of an MPI ensemble in one process, combined like MPIStrategy combines them.

    ``forward`` returns what the ensemble forward returns under MPI (e.g. log vote shares for hard voting);
    :meth:`member_outputs` returns the members' own outputs, stacked.

    Attributes:
        members: the members, plain modules (a ``torch.nn.ModuleList``), in rank order.
        voting: how ``forward`` combines them: ``"hard"``, ``"soft"``, ``"mean"`` or ``"median"``.
    """

    def __init__(self, members: list[Module], voting: str = "hard") -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.voting = voting
        self._combine = combiner(voting)

    def member_outputs(self, *args: Any, **kwargs: Any) -> Tensor:
        """Every member's output for the same input, ``[members, batch, ...]``."""
        return torch.stack([member(*args, **kwargs) for member in self.members])

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._combine(self.member_outputs(*args, **kwargs))


def load_ensemble(
    path: str | os.PathLike,
    build: Callable[..., Module],
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> EnsembleModel:
    """Build an :class:`EnsembleModel` from an ensemble checkpoint written by ``MPIStrategy(sync="ensemble")``.

    ``build`` makes one fresh member: a LightningModule class (called with the checkpoint's hyperparameters)
    or any function returning a module. The file is read with ``torch.load(weights_only=True)``: tensors,
    containers and primitives only (plus Lightning's hyperparameter containers), so a file from elsewhere cannot
    run code while it loads. Pass ``weights_only=False`` only for files you trust that need more (for example
    hyperparameters holding arbitrary objects).
    """
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    state = checkpoint.get("lightning_mpi", {})
    members = [rank["state_dict"] for rank in state.get("ranks", [])]
    if state.get("sync") != "ensemble" or not members:
        raise ValueError(f"{path} is not an ensemble checkpoint (written by MPIStrategy(sync='ensemble')).")
    hparams = checkpoint.get("hyper_parameters", {})
    modules = []
    for member_state in members:
        module = build(**hparams) if isinstance(build, type) else build()
        module.load_state_dict(member_state)
        modules.append(module.eval())
    voting = state.get("policy", {}).get("voting", state.get("voting", "hard"))
    return EnsembleModel(modules, voting)


# Plain hyperparameter containers that Lightning may store in a checkpoint.
_SAFE_GLOBALS = [AttributeDict, Namespace]
