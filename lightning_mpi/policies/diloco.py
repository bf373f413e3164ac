"""DiLoCo's outer step: the averager of ``MPIStrategy(sync="average", outer_optimizer=...)``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_mpi.buffers import bucketize
from lightning_mpi.comm import Communicator
from lightning_mpi.policies.averagers import Averager, ModelBuckets, average_buckets
from lightning_mpi.policies.base import trainable


class OuterStep(Averager):
    """DiLoCo's outer optimization (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication Training of
    Language Models"): at each synchronisation, every rank's change since the last one (its pseudo-gradient, old
    parameters minus new) is averaged over ranks and applied by an outer optimizer to the last synchronised
    parameters, which every rank then continues from. With ``SGD(lr=1)`` this is plain averaging. Buffers and
    frozen parameters, which the outer optimizer does not step, are averaged.

    ``wire_dtype`` (``torch.bfloat16`` or ``torch.float16``): the pseudo-gradients travel in that precision
    (gathered from every rank and summed in float32 here, since MPI's half-precision sums are not reliable),
    half the bytes of float32.
    """

    def __init__(
        self, factory: Callable[[list[Tensor]], Optimizer], wire_dtype: torch.dtype | str | None = None
    ) -> None:
        self._factory = factory
        self._wire_dtype = getattr(torch, wire_dtype) if isinstance(wire_dtype, str) else wire_dtype
        if self._wire_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"pseudo_gradient_dtype={wire_dtype!r}: choose None, 'bfloat16' or 'float16'.")
        self._params: list[Tensor] = []
        self._anchors: list[Tensor] = []
        self._optimizer: Optimizer | None = None
        self._pending: dict[str, Any] | None = None

    def attach(self, module: Module, restore: bool) -> None:
        self._params = trainable(module)
        self._anchors = [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in self._params]
        self._optimizer = self._factory(self._anchors)
        if restore and self._pending is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._anchors, list(self._pending["anchors"]))
            self._optimizer.load_state_dict(self._pending["optimizer"])
        self._pending = None

    def reset(self) -> None:
        # changes count from here
        with torch.no_grad():
            torch._foreach_copy_(self._anchors, [p.detach() for p in self._params])

    def synchronise(self, comm: Communicator, model: ModelBuckets) -> None:
        self._step(comm, model.bucket_mb)
        self.settle(comm, model)

    def settle(self, comm: Communicator, model: ModelBuckets) -> None:
        # Another outer step on zero changes would still move the parameters (momentum): only the rest is averaged.
        average_buckets(comm, model.excluding(self._params))

    def _step(self, comm: Communicator, bucket_mb: float) -> None:
        """Average the pseudo-gradients over ranks, step the outer optimizer, continue from its parameters."""
        assert self._optimizer is not None
        with torch.no_grad():
            deltas = torch._foreach_sub([a.detach() for a in self._anchors], [p.detach() for p in self._params])
            for bucket in bucketize(deltas, bucket_mb):
                self._average(comm, bucket.pack())
                bucket.unpack()
            for anchor, delta in zip(self._anchors, deltas):
                anchor.grad = delta
            self._optimizer.step()
            for anchor in self._anchors:
                anchor.grad = None
            torch._foreach_copy_([p.detach() for p in self._params], [a.detach() for a in self._anchors])

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.state_dict())

    def restore(self, snapshot: Any) -> None:
        assert self._optimizer is not None
        with torch.no_grad():
            torch._foreach_copy_(self._anchors, list(snapshot["anchors"]))
        self._optimizer.load_state_dict(snapshot["optimizer"])

    def _average(self, comm: Communicator, flat: Tensor) -> None:
        if self._wire_dtype is None or comm.size == 1:
            comm.allreduce_(flat, "mean")
            return
        parts = comm.allgather(flat.to(self._wire_dtype))
        total = torch.stack([part.to(torch.float32) for part in parts]).sum(0)
        flat.copy_(total / comm.size)

    def state_dict(self) -> dict[str, Any]:
        assert self._optimizer is not None
        return {"anchors": [a.detach().clone() for a in self._anchors], "optimizer": self._optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state  # applied when the parameters are known (attach)
