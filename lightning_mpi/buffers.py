"""Flat communication buffers: many tensors moved with one collective per bucket."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

#: Default bucket capacity. Without overlap of communication and backward, one large allreduce beats several
#: small ones (per-call latency dominates below ~1 MB), so most models fit in a single bucket.
DEFAULT_BUCKET_MB = 25.0
#: With overlap, smaller buckets, so that the first one is on the wire early in backward; not too small: each
#: call's progress engine polls the core that backward needs (measured between 2 emulated nodes, README's
#: "Gradients at network speed": 16 MiB matched or beat 4 and 1 MiB at 1 and 10 Gbit/s).
OVERLAP_BUCKET_MB = 16.0


def validate_bucket_mb(bucket_mb: float | None) -> float | None:
    """``bucket_mb`` as given, if it is a positive finite number or ``None``; a ``ValueError`` naming it otherwise."""
    if bucket_mb is not None and (
        isinstance(bucket_mb, bool)
        or not isinstance(bucket_mb, (int, float))
        or not math.isfinite(bucket_mb)
        or bucket_mb <= 0
    ):
        raise ValueError(
            f"bucket_mb={bucket_mb!r} is not valid: give the capacity of a communication buffer in MiB (a positive "
            "number, e.g. 25), or None for the default."
        )
    return bucket_mb


class Bucket:
    """One flat tensor holding ``tensors`` back to back, plus ``views``: per-tensor views into it."""

    def __init__(self, tensors: Sequence[Tensor], extra: int = 0) -> None:
        self.tensors = list(tensors)
        first = self.tensors[0]
        sizes = [t.numel() for t in self.tensors]
        self.flat = torch.zeros(sum(sizes) + extra, dtype=first.dtype, device=first.device)
        self.views = [v.view_as(t) for v, t in zip(self.flat[: sum(sizes)].split(sizes), self.tensors)]
        #: the trailing ``extra`` elements, free for the caller (e.g. one flag per tensor)
        self.tail = self.flat[sum(sizes) :]

    def pack(self) -> Tensor:
        """Copy the tensors' current values into the flat buffer and return it."""
        with torch.no_grad():
            torch._foreach_copy_(self.views, [t.detach() for t in self.tensors])
        return self.flat

    def unpack(self) -> None:
        """Copy the flat buffer's values back into the tensors."""
        with torch.no_grad():
            torch._foreach_copy_([t.detach() for t in self.tensors], self.views)


class ByteBucket:
    """Tensors of any dtypes (on one device) moved as raw bytes in one flat ``uint8`` buffer: one broadcast for all.

    >>> a, b = torch.arange(3.0), torch.tensor([7])
    >>> bucket = ByteBucket([a, b])
    >>> flat = bucket.pack()
    >>> _ = a.zero_(), b.zero_()
    >>> bucket.unpack()
    >>> a.tolist(), b.tolist()
    ([0.0, 1.0, 2.0], [7])
    """

    _ALIGN = 8

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        sizes = [t.numel() * t.element_size() for t in self.tensors]
        starts = []
        end = 0
        for size in sizes:
            starts.append(end)
            end += -(-size // self._ALIGN) * self._ALIGN
        self.flat = torch.zeros(end, dtype=torch.uint8, device=self.tensors[0].device if self.tensors else "cpu")
        self.views = [
            self.flat[start : start + size].view(t.dtype).view(t.shape)
            for start, size, t in zip(starts, sizes, self.tensors)
        ]

    def pack(self) -> Tensor:
        """Copy the tensors' current values into the flat buffer and return it."""
        with torch.no_grad():
            for view, t in zip(self.views, self.tensors):
                view.copy_(t.detach())
        return self.flat

    def unpack(self) -> None:
        """Copy the flat buffer's values back into the tensors."""
        with torch.no_grad():
            for view, t in zip(self.views, self.tensors):
                t.detach().copy_(view)


def bucketize(
    tensors: Iterable[Tensor], cap_mb: float = DEFAULT_BUCKET_MB, extra_per_tensor: int = 0, extra_per_bucket: int = 0
) -> list[Bucket]:
    """Group ``tensors`` into buckets of one dtype and device, each at most ``cap_mb`` (a larger tensor gets its own).

    Order is kept within each group, so every rank builds the same buckets from the same model.
    ``extra_per_tensor`` (per tensor) and ``extra_per_bucket`` reserve trailing elements in each bucket's ``tail``.
    """
    cap = max(1, int(cap_mb * 2**20))
    groups: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
    for t in tensors:
        chunks = groups.setdefault((t.dtype, t.device), [[]])
        current = chunks[-1]
        used = sum(x.numel() * x.element_size() for x in current)
        if current and used + t.numel() * t.element_size() > cap:
            chunks.append([t])
        else:
            current.append(t)
    return [
        Bucket(chunk, extra_per_tensor * len(chunk) + extra_per_bucket)
        for chunks in groups.values()
        for chunk in chunks
        if chunk
    ]
