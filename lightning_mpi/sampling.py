"""Evaluation shards that count every sample exactly once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


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


def _base_order(sampler: Sampler) -> list[int]:
    """The sample order before Lightning's distributed sampler split it between ranks."""
    wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    if wrapped is not None:  # Lightning's (Unrepeated)DistributedSamplerWrapper around the user's sampler
        return list(wrapped)
    if isinstance(sampler, DistributedSampler) or type(sampler).__name__ == "UnrepeatedDistributedSampler":
        n = len(sampler.dataset)  # type: ignore[arg-type]
        if getattr(sampler, "shuffle", False):
            generator = torch.Generator()
            generator.manual_seed(getattr(sampler, "seed", 0) + getattr(sampler, "epoch", 0))
            return torch.randperm(n, generator=generator).tolist()
        return list(range(n))
    return list(sampler)


def shard_evaluation_dataloader(dataloader: object, replicas: int, rank: int) -> object:
    """Give ``dataloader`` this rank's unpadded contiguous block of the samples (all samples if ``replicas == 1``).

    The dataloader is changed in place (its batch sampler's sampler is swapped). Objects that are not
    batched ``DataLoader``s are returned untouched.
    """
    if not isinstance(dataloader, DataLoader) or dataloader.batch_sampler is None:
        return dataloader
    batch_sampler = getattr(dataloader.batch_sampler, "_batch_sampler", dataloader.batch_sampler)
    if not hasattr(batch_sampler, "sampler"):
        return dataloader
    batch_sampler.sampler = ContiguousShard(_base_order(batch_sampler.sampler), replicas, rank)
    return dataloader
