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


def strategy_state(
    policy: SyncPolicy, comm: Communicator, module: Module, optimizer_states: list[dict[str, Any]]
) -> dict[str, Any]:
    """What MPIStrategy adds to a checkpoint under ``"lightning_mpi"`` (collective: call on every rank).

    Policies whose ranks hold different models or optimizer state (averaging between averagings, ensembles)
    also store every rank's own model and optimizer state under ``"ranks"``, so a resumed job continues exactly
    where each rank was; the checkpoint's ordinary ``state_dict`` stays the averaged model (or member 0).
    """
    state: dict[str, Any] = {"sync": policy.name, "world_size": comm.size, "policy": policy.state_dict()}
    if policy.ranks_differ:
        own = {"state_dict": module.state_dict(), "optimizer_states": optimizer_states}
        state["ranks"] = comm.gather_object(own, root=0)
    if isinstance(policy, Ensemble):
        state["voting"] = policy.voting
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
    members = [rank["state_dict"] for rank in state.get("ranks", [])]
    if state.get("sync") != "ensemble" or not members:
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
