"""The hook protocol every policy implements, and helpers shared by the policies.

The strategy calls these hooks at fixed points of Lightning's loop; every hook that communicates is reached
by all ranks in the same order (the strategy makes sure of that), so no hook can deadlock on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from lightning_mpi.buffers import bucketize
from lightning_mpi.comm import Communicator
from lightning_mpi.sampling import gather_shards, shard_evaluation_dataloader
from lightning_mpi.signals import FlagChannel


def floating_state(module: Module) -> list[Tensor]:
    """Parameters and floating-point buffers (BatchNorm running statistics), in a fixed order."""
    return list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]


def trainable(module: Module) -> list[Tensor]:
    """The floating-point parameters that require gradients, in the module's order."""
    return [p for p in module.parameters() if p.requires_grad and p.is_floating_point()]


def same_tensors(held: list[Tensor], current: list[Tensor]) -> bool:
    """Whether ``current`` is the very same tensors as ``held`` (identity: a re-assigned buffer is a new one)."""
    return len(held) == len(current) and all(a is b for a, b in zip(held, current))


def has_lazy_tensors(module: Module) -> bool:
    """Whether ``module`` holds parameters or buffers of lazy modules that no forward has materialised yet."""
    return any(is_lazy(t) for t in (*module.parameters(), *module.buffers()))


def broadcast_module(comm: Communicator, module: Module, root: int = 0) -> None:
    """Make every rank's (materialised) parameters and buffers equal to those of rank ``root``."""
    if comm.size == 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if not is_lazy(t)]
    for bucket in bucketize(tensors):
        comm.broadcast_(bucket.pack(), root)
        bucket.unpack()


class SyncPolicy:
    """How ranks are combined: the hooks MPIStrategy calls at fixed points of Lightning's loop.

    This base class trains every rank alone (nothing is communicated during training); evaluation takes a shard
    per rank. Hooks that communicate say so: every rank reaches them in the same order.
    """

    name = "none"
    #: evaluation and prediction see every sample on every rank (instead of a shard each)
    evaluates_all_samples = False
    #: gradients are averaged after backward (the strategy skips it on non-stepping micro-batches)
    syncs_gradients = False
    #: ranks may hold different models or optimizer state, so checkpoints keep every rank's own
    ranks_differ = True
    #: every rank must build the same model and optimizers (checked at the start of fit)
    identical_replicas = True
    #: a checkpoint's optimizer state is the average over the ranks (each rank's own is stored beside it)
    averages_optimizer_state_in_checkpoints = False
    #: a fit may resume at another world size (from the checkpoint's model; see :mod:`lightning_mpi.checkpoint`)
    resumes_at_any_world_size = False

    def __init__(self) -> None:
        self.comm: Communicator = Communicator()

    def setup(self, comm: Communicator, module: Module, fitting: bool, resuming: bool) -> None:
        self.comm = comm

    @property
    def flag_channel(self) -> FlagChannel | None:
        """A channel on which small agreements (a SIGTERM stop) ride with a collective this policy makes before
        every training batch anyway; ``None`` if it makes none."""
        return None

    @property
    def loss_scale(self) -> float:
        """Factor the strategy applies to the loss before a synchronised backward."""
        return 1.0

    def before_training_step(self, module: Module, synchronised: bool, source: int = 0) -> None:
        """Called before every ``training_step``; ``synchronised``: its backward will be synchronised; ``source``:
        the lowest rank with a batch of its own in this step (see ``lightning_mpi.join``)."""

    def before_backward(self, module: Module, synchronised: bool) -> None:
        """Called before every backward through the strategy (also on non-stepping micro-batches, where
        ``synchronised`` is false)."""

    def after_backward(self, module: Module, weight: float = 1.0) -> None:
        """Called after every backward whose gradients feed an optimizer step (collective where it communicates).
        Averaged gradients are multiplied by ``weight`` (more than 1 when some ranks had no batch to contribute)."""

    def after_optimizer_step(self, module: Module, optimizers: list[Optimizer]) -> None:
        """Called after the first optimizer of the module stepped."""

    def gradients_finite(self, module: Module) -> bool:
        """Whether every rank's gradients are finite; the same answer on every rank (collective)."""
        local = all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)
        flag = torch.tensor([0 if local else 1], dtype=torch.int32)
        return self.comm.allreduce_(flag, "max").item() == 0

    def on_train_epoch_start(self, module: Module, optimizers: list[Optimizer], epoch: int) -> None:
        """Called before the first batch of every training epoch."""

    def on_train_end(self, module: Module, optimizers: list[Optimizer]) -> None:
        """Called once at the end of fit, on every rank."""

    @contextmanager
    def evaluation(self, module: Module) -> Iterator[None]:
        """Context around validation, test and predict loops."""
        yield

    def before_evaluation_step(self, module: Module) -> None:
        """Called before every validation, test and predict step."""

    def evaluation_loader(self, dataloader: object, limit: int | None = None) -> object:
        """What a rank evaluates and predicts on: its share of the samples (see ``lightning_mpi.sampling``);
        ``limit``: the batches per rank an integer ``limit_val_batches``/``limit_test_batches`` allows."""
        return shard_evaluation_dataloader(dataloader, self.comm.size, self.comm.rank, limit)

    def collect_predictions(self, predictions: list[list[Any]], interleaved: bool = False) -> None:
        """Turn each rank's predictions (one list of batch outputs per dataloader) into everyone's, in place, in
        dataset order (``interleaved``: the shards of a limited prediction)."""
        gather_shards(predictions, self.comm, interleaved)

    def model_state_dict(self, module: Module) -> dict[str, Any]:
        """The model state a checkpoint holds (collective: called on every rank)."""
        return module.state_dict()

    def rank_state_dict(self, module: Module) -> dict[str, Any]:
        """This rank's own model state, from which it continues training (stored per rank if ``ranks_differ``)."""
        return module.state_dict()

    def restores_rank_states(self, fitting: bool) -> bool:
        """Whether a rank loads its own stored state (rather than the checkpoint's model) in this run."""
        return self.ranks_differ

    def continue_from_synchronised_model(self) -> None:
        """A fit resumes at another world size than the checkpoint's: every rank starts from its model."""
        raise NotImplementedError(f"sync={self.name!r} does not resume at another world size.")

    def hold_members(self, members: list[int], states: list[dict[str, Any]], total: int) -> None:
        """Evaluation at another world size than the checkpoint's: this rank holds members ``members`` (their model
        states ``states``) of ``total``."""
        raise NotImplementedError(f"sync={self.name!r} has no members.")

    def state_dict(self) -> dict[str, Any]:
        """What the policy keeps in a checkpoint (counters, DiLoCo's outer state); the same on every rank."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
