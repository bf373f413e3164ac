"""MPIStrategy's part of a checkpoint: the only code that reads or writes the ``"lightning_mpi"`` section and the
per-rank files beside it.

A checkpoint is an ordinary Lightning file: its ``state_dict`` is the model every rank agrees on (the synchronised
model under averaging, member 0 of an ensemble), so ``load_from_checkpoint`` in one process and
``trainer.test(ckpt_path=...)`` work as with any strategy. Where ranks hold states of their own (averaging between
synchronisations, ensembles), each rank writes its own model and optimizer state into a directory beside the file,
``<file>.ranks-<token>/rank-<r>.pt``: memory and bytes per rank do not grow with the number of ranks. The section::

    {"format": 2, "sync": "average", "world_size": 2, "policy": {...the policy's state_dict...},
     "shards": "epoch=3.ckpt.ranks-5f0c2a91"}

Order of writing, so that a checkpoint cut short never looks complete: every rank writes its file into a new
directory, all agree that every file is written, then rank 0 writes the main file (atomically for local files),
then removes the directories of earlier saves to the same path. Format 1 (before this layout) kept every rank's
state in the main file under ``"ranks"``; it still loads. Files without a ``"format"`` are format 1.

Resuming at another world size: averaging and DiLoCo continue from the synchronised model and the optimizer state
averaged over the ranks (the main file's), DiLoCo's outer state as stored; ensembles evaluate and predict at any
world size (each rank holds a share of the members, every member votes); an ensemble fit continues only at the
world size that wrote it.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import Module

from lightning_mpi.comm import Communicator

if TYPE_CHECKING:
    from lightning_mpi.policies import SyncPolicy

#: The layout of the ``"lightning_mpi"`` section this version writes; it reads this one and every older one.
FORMAT_VERSION = 2
SECTION = "lightning_mpi"
SHARDS_INFIX = ".ranks-"


def write(
    io: CheckpointIO,
    checkpoint: dict[str, Any],
    filepath: Any,
    storage_options: Any,
    policy: SyncPolicy,
    comm: Communicator,
    module: Module,
) -> None:
    """Write ``checkpoint`` (Lightning's dict, not changed) with the strategy's section, and each rank's own state
    beside it where ranks differ (collective: every rank calls it)."""
    section: dict[str, Any] = {}
    policy_state = policy.state_dict()
    if policy.ranks_differ or policy_state:
        section = {"format": FORMAT_VERSION, "sync": policy.name, "world_size": comm.size, "policy": policy_state}
    main = dict(checkpoint)
    if policy.ranks_differ and comm.size > 1:
        token = comm.broadcast_object(secrets.token_hex(4) if comm.rank == 0 else None, 0)
        section["shards"] = _shards_name(filepath, token)
        own = {"state_dict": policy.rank_state_dict(module), "optimizer_states": checkpoint.get("optimizer_states", [])}
        _write_own_shard(io, own, shard_path(filepath, section["shards"], comm.rank), comm)
        if policy.averages_optimizer_state_in_checkpoints and "optimizer_states" in main:
            main["optimizer_states"] = _averaged(comm, main["optimizer_states"])
    if comm.rank == 0:
        save(io, main, filepath, storage_options, section)
        if "shards" in section:
            remove_shards(filepath, keep=section["shards"])


def _write_own_shard(io: CheckpointIO, own: dict[str, Any], path: str, comm: Communicator) -> None:
    error: BaseException | None = None
    try:
        save(io, own, path, shared_directory=True)  # a new directory, every rank writing into it at once
    except Exception as caught:  # every rank must learn of it before rank 0 writes the main file
        error = caught
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    if comm.allreduce_(failed, "sum").item():
        raise RuntimeError(
            f"lightning-mpi: {int(failed.item())} rank(s) could not write their part of a checkpoint ("
            + (f"this rank: {error!r} writing {path}" if error else "this rank wrote its part")
            + "); the checkpoint was not written."
        ) from error


def _averaged(comm: Communicator, optimizer_states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``optimizer_states`` whose floating-point tensors are averaged over the ranks (collective)."""

    def average(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            return comm.allreduce_(value.detach().clone(), "mean")
        if isinstance(value, dict):
            return {k: average(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(average(v) for v in value)
        return value

    return [average(state) for state in optimizer_states]


def _shards_name(filepath: Any, token: str) -> str:
    return str(os.path.basename(os.fspath(filepath))) + SHARDS_INFIX + token


def shard_path(filepath: Any, shards: str, rank: int) -> str:
    """Where rank ``rank`` keeps its own state for the checkpoint at ``filepath`` (``shards``: the section's)."""
    path = os.fspath(filepath)
    if "://" not in path:
        path = os.path.realpath(path)  # through a symbolic link (ModelCheckpoint's save_last="link")
    return f"{path.rsplit('/', 1)[0] if '/' in path else '.'}/{shards}/rank-{rank}.pt"


def remove_shards(filepath: Any, keep: str | None = None) -> None:
    """Remove the per-rank directories of the checkpoint at ``filepath`` (all of them, or all but ``keep``)."""
    path = os.fspath(filepath)
    fs = get_filesystem(path)
    for found in fs.glob(path + SHARDS_INFIX + "*"):
        if keep is None or os.path.basename(str(found).rstrip("/")) != keep:
            fs.rm(found, recursive=True)


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


def stored_rank_state(io: CheckpointIO, section: dict[str, Any], path: Any, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s own model and optimizer state as stored with the checkpoint at ``path``."""
    if "shards" in section:
        loaded: dict[str, Any] = io.load_checkpoint(shard_path(path, section["shards"], rank))
        return loaded
    ranks: list[dict[str, Any]] = section["ranks"]  # format 1: every rank's state in the main file
    return ranks[rank]


def restore(
    checkpoint: dict[str, Any],
    policy: SyncPolicy,
    io: CheckpointIO,
    rank: int,
    world_size: int,
    fitting: bool,
    path: Any = None,
) -> None:
    """Give ``policy`` its stored state and, where it continues from each rank's own state, put this rank's model
    and optimizer state where Lightning loads from (on every rank)."""
    section = checkpoint_section(checkpoint, path)
    stored = int(section.get("world_size", 1))
    if section.get("sync") == "ensemble" and policy.name != "ensemble":
        rank_zero_warn(
            f"{path} is an ensemble checkpoint of {stored} member(s), loaded under MPIStrategy(sync={policy.name!r}): "
            "the model is member 0 alone. Evaluate the ensemble with MPIStrategy(sync='ensemble') (any world size) "
            "or lightning_mpi.load_ensemble(path, MyModule)."
        )
    policy.load_state_dict(section.get("policy", {}))
    own_states = "shards" in section or "ranks" in section
    if not own_states or not policy.restores_rank_states(fitting):
        return
    if stored == world_size:
        own = stored_rank_state(io, section, path, rank)
        checkpoint["state_dict"], checkpoint["optimizer_states"] = own["state_dict"], own["optimizer_states"]
        return
    if not fitting:  # an ensemble evaluated at another world size: this rank's share of the members
        members = list(range(rank, stored, world_size))
        states = [stored_rank_state(io, section, path, m)["state_dict"] for m in members]
        policy.hold_members(members, states, stored)
        return
    if not policy.resumes_at_any_world_size:
        raise ValueError(
            f"{path or 'This checkpoint'} holds an ensemble of {stored} member(s), one per rank, but the job runs "
            f"{world_size} rank(s): continue training it with mpirun -n {stored}. Testing and predicting work at any "
            "world size."
        )
    rank_zero_info(
        f"lightning-mpi: {path} was written by {stored} rank(s); the {world_size} rank(s) of this job continue from "
        "its synchronised model and the optimizer state averaged over those ranks."
    )
    policy.continue_from_synchronised_model()


def save(
    io: CheckpointIO,
    checkpoint: dict[str, Any],
    filepath: Any,
    storage_options: Any = None,
    section: dict[str, Any] | None = None,
    shared_directory: bool = False,
) -> None:
    """Save ``checkpoint`` with ``section`` (the strategy's, see :func:`write`; none if empty) through ``io`` at
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
        with _temporary_files_in(directory, remove_leftovers=not shared_directory):
            io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
    else:
        io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)


#: How the default IO's temporary file in a checkpoint's directory is named while it is written.
PARTIAL_PREFIX = ".partial-checkpoint-"


@contextmanager
def _temporary_files_in(directory: str, remove_leftovers: bool = True) -> Iterator[None]:
    """fsspec's temporary file in ``directory``, under a name that says what it is. One that a killed job left
    behind (an interruption that unwinds removes its own) is removed by the next save into the directory, unless
    other ranks write into it at the same time (``remove_leftovers=False``)."""
    if remove_leftovers:
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
