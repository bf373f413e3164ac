"""Ensembles: one member per rank, combined at evaluation (``MPIStrategy(sync="ensemble")``)."""

from __future__ import annotations

import hashlib
import os
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn import Module
from torch.nn.parameter import is_lazy

from lightning_mpi import voting as voting_functions
from lightning_mpi.checkpoint import checkpoint_section, shard_path
from lightning_mpi.comm import Communicator
from lightning_mpi.policies.base import SyncPolicy
from lightning_mpi.sampling import shard_evaluation_dataloader


class Ensemble(SyncPolicy):
    """Every rank trains its own member on its own shard; evaluation combines the members.

    Members must start from different weights: when a fit starts with the same weights on every rank (a shared
    seed), each member is re-initialised once with a rank-dependent seed; a later fit (fine-tuning, or continuing
    after ``fit`` returned) finds the members different and continues from them. Validation, test and predict
    give every rank all samples in the same order; the module's ``forward`` then returns the combined output of
    all members (see :mod:`lightning_mpi.voting`; tuples, lists and dicts of tensors are combined leaf by leaf),
    so metrics and predictions see the ensemble. ``member_outputs`` holds the last gathered per-member outputs
    (``[members, batch, ...]``, or the same structure as the outputs) for per-member metrics. One rank is one
    member: it then trains and evaluates exactly like a single-device Trainer.

    Args:
        voting: how members are combined: ``"hard"`` (majority of predicted classes), ``"soft"`` (mean
            probability), ``"mean"`` or ``"median"`` (regression); see :mod:`lightning_mpi.voting`.
        seed: base seed of the members' re-initialisation (default: the current torch seed); member ``r`` uses a
            seed derived from it and ``r``.
    """

    name = "ensemble"
    evaluates_all_samples = True
    identical_replicas = False

    def __init__(self, *, voting: str = "hard", seed: int | None = None) -> None:
        super().__init__()
        self.combine = voting_functions.combiner(voting)
        self.voting = voting
        self.seed = seed
        self.member_outputs: Any = None
        #: members this rank evaluates when a checkpoint of another world size was loaded (else its own module)
        self._held: _HeldMembers | None = None

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        super().setup(comm, module, fitting, resuming)
        if fitting:
            self._held = None  # training: one member per rank, the module itself
        if fitting and not resuming and comm.size > 1 and _same_on_every_rank(comm, module):
            base = self.seed if self.seed is not None else torch.initial_seed()
            torch.manual_seed((base + 7919 * comm.rank) % 2**63)
            for sub in module.modules():
                if sub is not module and callable(getattr(sub, "reset_parameters", None)):
                    sub.reset_parameters()  # type: ignore[operator]

    def hold_members(self, members: list[int], states: list[dict[str, Any]], total: int) -> None:
        self._held = _HeldMembers(states, total)

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        held = self._held
        if self.comm.size == 1 and held is None:
            yield
            return
        if held is not None:
            held.bind(self.comm)
        original = module.forward
        own = module.__dict__.get("forward")
        own_state = {k: v.clone() for k, v in module.state_dict().items()} if held is not None else None

        def ensemble_forward(*args: Any, **kwargs: Any) -> Any:
            if held is None:  # one member per rank: this module
                members = apply_to_collection(original(*args, **kwargs), Tensor, self._gather)
            else:
                members = apply_to_collection(held.outputs(module, original, args, kwargs), Tensor, held.gather)
            self.member_outputs = members
            return apply_to_collection(members, Tensor, self._combine)

        module.forward = ensemble_forward
        try:
            yield
        finally:
            if own is None:
                del module.forward
            else:
                module.forward = own
            if own_state is not None:
                module.load_state_dict(own_state)

    def _gather(self, output: Tensor) -> Tensor:
        return torch.stack(self.comm.allgather(output.detach()))

    def _combine(self, members: Tensor) -> Tensor:
        # Every rank holds the same gathered outputs, so every rank raises this error alike.
        voting_functions.check_fits(self.voting, members)
        return self.combine(members)

    def evaluation_loader(self, dataloader: object, limit: int | None = None) -> object:
        return shard_evaluation_dataloader(dataloader, 1, 0)  # every member sees every sample, in order

    def collect_predictions(self, predictions: list[list[Any]], interleaved: bool = False) -> None:
        """Every rank already holds the ensemble's predictions for every sample."""

    def restores_rank_states(self, fitting: bool) -> bool:
        return True  # every rank evaluates (or continues training) its own member

    def state_dict(self) -> dict[str, Any]:
        return {"voting": self.voting}


class _HeldMembers:
    """The members one rank evaluates when the job's world size differs from the checkpoint's: rank ``r`` of ``N``
    holds members ``r, r + N, ...`` of ``total`` (none if ``r >= total``), and every forward gathers all of them."""

    def __init__(self, states: list[dict[str, Any]], total: int) -> None:
        self.states = states
        self.total = total
        self.comm: Communicator | None = None
        self._order = torch.arange(total)

    def bind(self, comm: Communicator) -> None:
        """Gather over ``comm`` (the job's, known once the strategy is set up)."""
        self.comm = comm
        everyone = [m for r in range(comm.size) for m in range(r, self.total, comm.size)]  # the gathers' order
        self._order = torch.tensor(sorted(range(self.total), key=everyone.__getitem__), dtype=torch.int64)

    def outputs(self, module: Module, forward: Any, args: Any, kwargs: Any) -> Any:
        """This rank's members' outputs, stacked ``[held, batch, ...]`` leaf by leaf (empty if it holds none)."""
        if not self.states:  # the shapes only: this rank takes part in the gathers with nothing
            return apply_to_collection(forward(*args, **kwargs), Tensor, lambda t: t.detach().unsqueeze(0)[:0])
        outputs = []
        for state in self.states:
            module.load_state_dict(state)
            outputs.append(forward(*args, **kwargs))
        return _stack(outputs)

    def gather(self, held: Tensor) -> Tensor:
        """Every rank's held outputs, ``[members, batch, ...]`` in member order."""
        assert self.comm is not None
        return torch.cat(self.comm.allgather(held.contiguous()))[self._order]


def _stack(outputs: list[Any]) -> Any:
    """Outputs of the same structure, stacked leaf by leaf along a new first dimension."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack([o.detach() for o in outputs])
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in outputs]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_stack(list(parts)) for parts in zip(*outputs))
    return first


def _same_on_every_rank(comm: Communicator, module: Module) -> bool:
    """Whether every rank holds exactly the same parameters (one fingerprint per rank, compared)."""
    digest = hashlib.blake2b(digest_size=16)
    for p in module.parameters():
        if not is_lazy(p):
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return len(set(comm.allgather_object(digest.hexdigest()))) == 1


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
        self._combine = voting_functions.combiner(voting)

    def member_outputs(self, *args: Any, **kwargs: Any) -> Tensor:
        """Every member's output for the same input, ``[members, batch, ...]``."""
        return torch.stack([member(*args, **kwargs) for member in self.members])

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._combine(self.member_outputs(*args, **kwargs))


def load_ensemble(
    path: str | os.PathLike[str],
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
        state = checkpoint_section(checkpoint, path)
        if state.get("sync") != "ensemble":
            raise ValueError(f"{path} is not an ensemble checkpoint (written by MPIStrategy(sync='ensemble')).")
        if "shards" in state:  # one file per member beside the checkpoint, read one at a time
            members = [
                torch.load(shard_path(path, state["shards"], r), map_location=map_location, weights_only=weights_only)[
                    "state_dict"
                ]
                for r in range(int(state["world_size"]))
            ]
        else:  # format 1 (every member in the file), or one member
            members = [rank["state_dict"] for rank in state.get("ranks", [])] or [checkpoint["state_dict"]]
    hparams = checkpoint.get("hyper_parameters", {})
    modules = []
    for member_state in members:
        module = build(**hparams) if isinstance(build, type) else build()
        module.load_state_dict(member_state)
        modules.append(module.eval())
    voting = state.get("policy", {}).get("voting", state.get("voting", "hard"))
    return EnsembleModel(modules, voting)


# Plain hyperparameter containers that Lightning may store in a checkpoint.
_SAFE_GLOBALS: list[Any] = [AttributeDict, Namespace]
