"""Uneven training inputs: ranks that run out of batches join the others until every rank is done.

The idea of ``torch.distributed.algorithms.Join`` and ``hvd.join``, inside Lightning's loop: a rank without a
batch keeps stepping with the others (so hooks, optimizer steps, schedulers, ``global_step``, validation and
checkpoints stay in lockstep), replaying its last batch without running ``training_step`` and contributing
nothing to the gradients, which are then averaged over the ranks that had data. All ranks end the epoch at the
same batch.

Which rank has a batch at which step is known without a collective when every rank's loader has a length (one
exchange of lengths when the loader is set up); for loaders without a length (an ``IterableDataset``), the ranks
exchange one flag each before every batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from lightning_mpi.comm import Communicator


class UnevenInputsError(RuntimeError):
    """Ranks ran out of training batches at different steps, in a way the strategy cannot bridge."""


class StepStatus(NamedTuple):
    """Which ranks have a real batch at one training step (the same on every rank)."""

    active: tuple[bool, ...]
    rank: int

    @property
    def joined(self) -> bool:
        """This rank has no batch of its own: it replays its last one and contributes nothing."""
        return not self.active[self.rank]

    @property
    def uneven(self) -> bool:
        return not all(self.active)

    @property
    def contributing(self) -> int:
        """How many ranks have a batch of their own."""
        return sum(self.active)

    @property
    def source(self) -> int:
        """The lowest rank with a batch: the one whose forward counts (e.g. for buffers that follow one rank)."""
        return self.active.index(True)


class UnevenInputs:
    """The strategy's record of the steps' statuses, fed by :class:`JoinedBatches` in the order it yields."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self._pending: deque[StepStatus] = deque()
        self._loader: object | None = None
        #: the status of the training step in progress (``None``: every rank has a batch)
        self.current: StepStatus | None = None
        self._backwards = 0
        self._contributions = 0

    def start_epoch(self) -> None:
        self._pending.clear()
        self._loader = None
        self.current = None

    def record(self, status: StepStatus, loader: object) -> None:
        if self._loader not in (None, loader):
            raise UnevenInputsError(
                "Uneven inputs in several training dataloaders: ranks have different numbers of batches in more than "
                "one of them, which the strategy cannot bridge. Give every rank the same number of batches."
            )
        self._loader = loader
        self._pending.append(status)

    def loader(self, dataloader: Any, module: LightningModule | None) -> Any:
        """The training loader every rank iterates in lockstep (``dataloader`` itself in one process, or where
        ``training_step(dataloader_iter)`` pulls its own batches: there is no batch per step to bridge)."""
        pulls = module is not None and is_param_in_hook_signature(
            module.training_step, "dataloader_iter", explicit=True
        )
        if self.comm.size == 1 or pulls:
            return dataloader
        return JoinedBatches(dataloader, self.comm, self)

    def next_step(self, automatic_optimization: bool) -> None:
        """Called at every training batch start, in batch order: take this step's status. While some rank has no
        batch, every collective checks that all ranks call the same one (a per-step collective in
        ``training_step`` cannot be answered by a rank that skips it)."""
        self.current = self._pending.popleft() if self._pending else None
        uneven = self.current is not None and self.current.uneven
        if uneven and not automatic_optimization:
            raise UnevenInputsError(
                f"Uneven inputs: at this training step only ranks {self._ranks(True)} have a batch and ranks "
                f"{self._ranks(False)} have run out. Under manual optimization the strategy cannot step for the "
                "ranks without data: give every rank the same number of batches (e.g. Lightning's distributed "
                "sampler, or drop_last and equal shards)."
            )
        self.comm.require_same_calls(self._collective_in_step_reason() if uneven else None)

    def stop_checking(self) -> None:
        """Outside training steps (evaluation, the end of fit) ranks run in lockstep again."""
        self.comm.require_same_calls(None)

    def _collective_in_step_reason(self) -> str:
        return (
            f"Uneven inputs: ranks {self._ranks(False)} have run out of training batches and step on with the others "
            f"without running training_step, while ranks {self._ranks(True)} still train. A collective inside "
            "training_step (self.log(..., on_step=True, sync_dist=True), self.all_gather, a metric's compute) cannot "
            "be answered by the ranks without data. Give every rank the same number of batches, or keep per-step "
            "collectives out of training_step (for example log with on_step=False, on_epoch=True)."
        )

    def _ranks(self, active: bool) -> list[int]:
        assert self.current is not None
        return [r for r, a in enumerate(self.current.active) if a == active]

    @property
    def joined(self) -> bool:
        """This rank has no batch of its own in this step: it runs no ``training_step`` and no backward."""
        return self.current is not None and self.current.joined

    @property
    def source(self) -> int:
        """The lowest rank with a batch of its own in this step."""
        return self.current.source if self.current is not None else 0

    def placeholder_loss(self, device: torch.device) -> torch.Tensor:
        """What a joined rank's step returns to Lightning: a loss of zero that needs no backward."""
        return torch.zeros((), device=device, requires_grad=True)

    def count_backward(self) -> None:
        self._backwards += 1
        self._contributions += self.current.contributing if self.current is not None else self.comm.size

    def gradient_weight(self) -> float:
        """Factor for gradients summed over ranks since the last synchronisation (each a ``1/N`` share), so that
        they average over the (rank, micro-batch) pairs that had data; resets the count."""
        expected, contributions = self._backwards * self.comm.size, self._contributions
        self._backwards = self._contributions = 0
        return expected / contributions if 0 < contributions < expected else 1.0


class JoinedBatches:
    """A training loader that yields the same number of batches on every rank, recording which are real.

    ``len()`` is the largest number of batches of any rank. ``sampler``, ``batch_sampler`` and ``dataset`` stay
    reachable (Lightning sets the sampler's epoch through them); ``worker_init_fn`` is the loader's.
    """

    def __init__(self, loader: Any, comm: Communicator, record: UnevenInputs) -> None:
        self.loader = loader
        self._comm = comm
        self._record = record
        lengths = comm.allgather_object(_sized_len(loader))
        #: every rank's number of batches, or None if some rank's loader has no length
        self.lengths: list[int] | None = None if any(n is None for n in lengths) else lengths
        self.sampler = getattr(loader, "sampler", None)
        self.batch_sampler = getattr(loader, "batch_sampler", None)
        self.dataset = getattr(loader, "dataset", None)

    @property
    def worker_init_fn(self) -> Any:
        return getattr(self.loader, "worker_init_fn", None)

    @worker_init_fn.setter
    def worker_init_fn(self, value: Any) -> None:
        self.loader.worker_init_fn = value

    def __getattr__(self, name: str) -> Any:  # num_workers, persistent_workers, ... for Lightning's checks
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        if self.lengths is None:
            raise TypeError("this loader has no length on some rank")
        return max(self.lengths)

    def __iter__(self) -> Iterator[Any]:
        self._record.start_epoch()
        if self.lengths is not None and len(set(self.lengths)) == 1:
            return iter(self.loader)  # the usual case: nothing to bridge, nothing recorded
        return self._known_lengths() if self.lengths is not None else self._agreed_each_batch()

    def _known_lengths(self) -> Iterator[Any]:
        assert self.lengths is not None
        rank = self._comm.rank
        _check_every_rank_has_a_batch([n > 0 for n in self.lengths])
        batches = iter(self.loader)
        last = None
        for index in range(max(self.lengths)):
            active = tuple(n > index for n in self.lengths)
            if active[rank]:
                last = next(batches)
            self._record.record(StepStatus(active, rank), self)
            yield last

    def _agreed_each_batch(self) -> Iterator[Any]:
        rank, size = self._comm.rank, self._comm.size
        batches = iter(self.loader)
        last = None
        first = True
        while True:
            batch = next(batches, _END)
            flags = torch.zeros(size, dtype=torch.int32)
            flags[rank] = 0 if batch is _END else 1
            active = tuple(bool(f) for f in self._comm.allreduce_(flags, "sum").tolist())
            if not any(active):
                return
            if first:
                _check_every_rank_has_a_batch(list(active))
                first = False
            last = last if batch is _END else batch
            self._record.record(StepStatus(active, rank), self)
            yield last


_END = object()


def _sized_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except (TypeError, NotImplementedError):
        return None


def _check_every_rank_has_a_batch(has: list[bool]) -> None:
    if not all(has):
        empty = [r for r, h in enumerate(has) if not h]
        raise UnevenInputsError(
            f"Uneven inputs: ranks {empty} have no training batch at all. Ranks that run out of batches are bridged "
            "until every rank is done, but each rank needs at least one batch of its own: give every rank data."
        )
