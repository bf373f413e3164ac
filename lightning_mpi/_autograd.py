"""The one torch internal lightning-mpi relies on: running code at the end of a backward pass.

DDP finishes its gradient reduction the same way (``Variable._execution_engine.queue_callback``), so that the
reduction happens inside ``backward()``: everything after it (``on_after_backward``, clipping, AMP unscaling, the
optimizer) sees averaged gradients, whoever called ``backward``. ``tests/test_lightning_internals.py`` checks it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.autograd import Variable


def during_next_backward(loss: Tensor, scale: float = 1.0, at_end: Callable[[], None] | None = None) -> None:
    """In the next backward pass through ``loss``: multiply the gradient that reaches ``loss`` by ``scale`` (so
    every gradient is scaled, while ``loss`` itself and the hooks that see it are not), and call ``at_end`` once
    every gradient of that pass is accumulated, before ``backward()`` returns (an exception raised there
    propagates from ``backward()``). Later passes through the same ``loss`` are untouched."""
    if not loss.requires_grad or (scale == 1.0 and at_end is None):
        return
    done = False

    def hook(grad: Tensor) -> Tensor:
        nonlocal done
        if done:
            return grad
        done = True
        if at_end is not None:
            Variable._execution_engine.queue_callback(at_end)
        return grad * scale if scale != 1.0 else grad

    loss.register_hook(hook)
