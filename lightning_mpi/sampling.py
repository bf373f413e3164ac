"""Evaluation shards that count every sample exactly once, with the same number of batches on every rank."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, Sampler

from lightning_mpi._lightning import (
    batch_sampler_inside_wrapper,
    replace_batch_sampler_inside_wrapper,
    sampler_inside_wrapper,
)
from lightning_mpi.comm import Communicator


class ContiguousShard(Sampler[int]):
    """Block ``rank`` of ``indices`` cut into ``replicas`` nearly equal contiguous blocks (no padding).

    Concatenating the blocks in rank order gives ``indices`` back, so outputs gathered in rank order are in
    dataset order.

    >>> [list(ContiguousShard(range(7), 3, r)) for r in range(3)]
    [[0, 1, 2], [3, 4], [5, 6]]
    """

    def __init__(self, indices: Sequence[int], replicas: int, rank: int) -> None:
        n = len(indices)
        start = rank * (n // replicas) + min(rank, n % replicas)
        stop = start + n // replicas + (1 if rank < n % replicas else 0)
        self.indices = list(indices)[start:stop]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EvenShardBatches(Sampler[list[int]]):
    """This rank's batches of an evaluation set: a contiguous block (see :class:`ContiguousShard`) cut into as many
    batches as every other rank's block, so per-step collectives in evaluation pair up across ranks.

    Every rank runs ``ceil(ceil(n / replicas) / batch_size)`` batches; batch sizes differ by at most one sample
    (over all ranks and batches) and never exceed ``batch_size``. Every sample is in exactly one batch of one
    rank, and concatenating the ranks' batches in rank order gives ``indices`` in order. With ``drop_last``, every
    rank runs ``n // replicas // batch_size`` full batches and the rest of its block is dropped.

    >>> [list(EvenShardBatches(range(9), 4, 2, r)) for r in range(2)]
    [[[0, 1, 2], [3, 4]], [[5, 6], [7, 8]]]
    >>> [len(EvenShardBatches(range(101), 10, 2, r)) for r in range(2)]
    [6, 6]
    """

    def __init__(
        self, indices: Sequence[int], batch_size: int, replicas: int, rank: int, drop_last: bool = False
    ) -> None:
        n = len(indices)
        if n < replicas:
            raise ValueError(
                f"The evaluation dataloader has {n} sample(s) for {replicas} ranks: every rank needs at least one "
                "sample (samples are never repeated, so that each counts once). Evaluate on at least as many samples "
                "as ranks, or evaluate in one process."
            )
        block = ContiguousShard(indices, replicas, rank).indices
        if drop_last:
            count = (n // replicas) // batch_size
            self.batches = [block[i * batch_size : (i + 1) * batch_size] for i in range(count)]
            return
        count = math.ceil(math.ceil(n / replicas) / batch_size)
        small, extra = divmod(len(block), count)
        sizes = [small + 1] * extra + [small] * (count - extra)
        starts = [sum(sizes[:i]) for i in range(count)]
        self.batches = [block[start : start + size] for start, size in zip(starts, sizes)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _base_order(sampler: Sampler[Any]) -> list[int]:
    """The sample order before Lightning's distributed sampler split it between ranks."""
    wrapped = sampler_inside_wrapper(sampler)
    if wrapped is not None:
        return [int(i) for i in wrapped]  # type: ignore[attr-defined]  # a sampler: iterable
    if isinstance(sampler, DistributedSampler) or type(sampler).__name__ == "UnrepeatedDistributedSampler":
        n = len(sampler.dataset)  # type: ignore[attr-defined]
        if getattr(sampler, "shuffle", False):
            generator = torch.Generator()
            generator.manual_seed(getattr(sampler, "seed", 0) + getattr(sampler, "epoch", 0))
            return torch.randperm(n, generator=generator).tolist()
        return list(range(n))
    return list(sampler)


class LimitedShardBatches(Sampler[list[int]]):
    """This rank's ``limit`` full batches of an evaluation limited to ``limit`` batches per rank: the first
    ``limit * replicas`` batches that one process would evaluate, batch ``k * replicas + rank`` to rank ``rank`` (the
    samples DDP's interleaved shards give, so the limit selects the same samples as one process and DDP).

    >>> [list(LimitedShardBatches(range(20), 2, 2, r, limit=2)) for r in range(2)]
    [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    """

    def __init__(self, indices: Sequence[int], batch_size: int, replicas: int, rank: int, limit: int) -> None:
        order = list(indices)
        self.batches = [
            order[(k * replicas + rank) * batch_size : (k * replicas + rank + 1) * batch_size] for k in range(limit)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def shard_evaluation_dataloader(dataloader: object, replicas: int, rank: int, limit: int | None = None) -> object:
    """Give ``dataloader`` this rank's share of the samples: all of them if ``replicas == 1``, else
    :class:`EvenShardBatches` (same number of batches on every rank, every sample once); with ``limit`` batches per
    rank that leave samples out, :class:`LimitedShardBatches` (the samples one process evaluates in
    ``limit * replicas`` batches).

    The dataloader is changed in place. Left untouched: objects that are not ``DataLoader``s, loaders of an
    ``IterableDataset`` (the user shards those, as under DDP: their sampler is infinite) and loaders without
    batching. A custom batch sampler keeps its batching and gets a contiguous block of the samples, so ranks may
    then run different numbers of batches.
    """
    if not isinstance(dataloader, DataLoader) or isinstance(dataloader.dataset, IterableDataset):
        return dataloader
    outer = dataloader.batch_sampler
    if outer is None:
        return dataloader
    batch_sampler = batch_sampler_inside_wrapper(outer)
    if not hasattr(batch_sampler, "sampler"):
        return dataloader
    order = _base_order(batch_sampler.sampler)
    if replicas == 1 or type(batch_sampler) is not BatchSampler:
        batch_sampler.sampler = ContiguousShard(order, replicas, rank)
        return dataloader
    size = batch_sampler.batch_size
    if limit is not None and limit * replicas * size < len(order):
        batches: Sampler[list[int]] = LimitedShardBatches(order, size, replicas, rank, limit)
    else:
        batches = EvenShardBatches(order, size, replicas, rank, batch_sampler.drop_last)
    if outer is not batch_sampler:
        replace_batch_sampler_inside_wrapper(outer, batches)
    else:
        # DataLoader forbids assigning batch_sampler after construction; its iterators read it at each epoch.
        object.__setattr__(dataloader, "batch_sampler", batches)
    return dataloader


def shard_layout(dataloader: object) -> str | None:
    """How :func:`shard_evaluation_dataloader` split ``dataloader``: ``"blocks"`` (contiguous, in rank order),
    ``"interleaved"`` (a limit's batches, batch ``k * replicas + rank``), or ``None`` (left to the user)."""
    outer = getattr(dataloader, "batch_sampler", None) if isinstance(dataloader, DataLoader) else None
    if outer is None:
        return None
    inner = batch_sampler_inside_wrapper(outer)
    if isinstance(inner, LimitedShardBatches):
        return "interleaved"
    if isinstance(inner, EvenShardBatches) or isinstance(getattr(inner, "sampler", None), ContiguousShard):
        return "blocks"
    return None


def gather_shards(outputs: list[list[Any]], comm: Communicator, interleaved: bool = False) -> None:
    """Replace each rank's outputs (one list of batch outputs per dataloader) by those of every rank, in dataset
    order (a collective): shards are contiguous blocks in rank order, or with ``interleaved`` (a limit's batches)
    batch ``k`` of every rank in rank order, then batch ``k + 1``."""
    for local in outputs:
        everyone = comm.allgather_object(list(local))
        if interleaved:
            local[:] = [
                part[k] for k in range(max(map(len, everyone), default=0)) for part in everyone if k < len(part)
            ]
        else:
            local[:] = [batch for part in everyone for batch in part]


def integer_evaluation_limit(trainer: Trainer) -> int | None:
    """The number of batches per rank that an integer ``limit_val_batches`` / ``limit_test_batches`` /
    ``limit_predict_batches`` allows in the current stage (``None``: no integer limit; fractions are left to
    Lightning). The sanity check
    prepares the validation loader that fit's validation then reuses."""
    limit = {
        RunningStage.SANITY_CHECKING: trainer.limit_val_batches,
        RunningStage.VALIDATING: trainer.limit_val_batches,
        RunningStage.TESTING: trainer.limit_test_batches,
        RunningStage.PREDICTING: trainer.limit_predict_batches,
    }.get(trainer.state.stage)  # type: ignore[arg-type]
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None
