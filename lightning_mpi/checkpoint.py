"""Checkpoint files of MPIStrategy: written once and atomically; ensembles keep every member."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from torch import Tensor
from torch.nn import Module

from lightning_mpi.comm import Communicator
from lightning_mpi.sync import Ensemble, SyncPolicy, combiner


def strategy_state(policy: SyncPolicy, comm: Communicator, state_dict: dict[str, Any] | None) -> dict[str, Any]:
    """What MPIStrategy adds to a checkpoint under ``"lightning_mpi"`` (collective: call on every rank)."""
    state: dict[str, Any] = {"sync": policy.name, "world_size": comm.size, "policy": policy.state_dict()}
    if isinstance(policy, Ensemble):
        state["voting"] = policy.voting
        state["members"] = comm.gather_object(state_dict, root=0)
    return state


def write_atomically(io: CheckpointIO, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
    """Save through ``io`` to a temporary file next to ``filepath``, then rename: never a truncated checkpoint."""
    path = os.fspath(filepath)
    if "://" in path:  # remote storage: renames are not atomic there, let the IO plugin handle it
        io.save_checkpoint(checkpoint, path, storage_options=storage_options)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        io.save_checkpoint(checkpoint, tmp, storage_options=storage_options)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def member_for_rank(members: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """The ensemble member a rank resumes from."""
    if len(members) != world_size:
        raise ValueError(
            f"This ensemble checkpoint holds {len(members)} members but the job runs {world_size} ranks: "
            f"resume it with mpirun -n {len(members)}, or build a single-process model with load_ensemble()."
        )
    return members[rank]


class EnsembleModel(Module):
    """The members of an MPI ensemble in one process, combined like MPIStrategy combines them.

    ``forward`` returns what the ensemble forward returns under MPI (e.g. log vote shares for hard voting);
    :attr:`members` are plain modules.
    """

    def __init__(self, members: list[Module], voting: str = "hard") -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.voting = voting
        self._combine = combiner(voting)

    def member_outputs(self, *args: Any, **kwargs: Any) -> Tensor:
        return torch.stack([member(*args, **kwargs) for member in self.members])

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._combine(self.member_outputs(*args, **kwargs))


def load_ensemble(path: str | os.PathLike, build: Callable[..., Module], map_location: Any = "cpu") -> EnsembleModel:
    """Build an :class:`EnsembleModel` from an ensemble checkpoint written by ``MPIStrategy(sync="ensemble")``.

    ``build`` makes one fresh member: a LightningModule class (called with the checkpoint's hyperparameters)
    or any function returning a module.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    state = checkpoint.get("lightning_mpi", {})
    members = state.get("members")
    if not members:
        raise ValueError(f"{path} is not an ensemble checkpoint (written by MPIStrategy(sync='ensemble')).")
    hparams = checkpoint.get("hyper_parameters", {})
    modules = []
    for member_state in members:
        module = build(**hparams) if isinstance(build, type) else build()
        module.load_state_dict(member_state)
        modules.append(module.eval())
    return EnsembleModel(modules, state.get("voting", "hard"))


def gather_predictions(predict_loop: Any, comm: Communicator) -> None:
    """Replace each rank's predictions by those of all ranks, in dataset order (shards are contiguous blocks)."""
    for local in predict_loop._predictions:
        everyone = comm.allgather_object(list(local))
        local[:] = [batch for part in everyone for batch in part]
