"""One bucket of the gradient allreduce, and what its allreduce needs on every step."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mpi.buffers import Bucket
from lightning_mpi.comm import Communicator
from lightning_mpi.signals import FlagChannel

# bfloat16 has no numpy dtype: its buckets' tails are written through torch (and reduced in float32 by the comm).
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


class GradientBucket:
    """A bucket of gradients and what its allreduce needs on every step.

    One step of a bucket, as :class:`~lightning_mpi.policies.allreduce.GradientAllreduce` drives it:

    ============  ==============================  ===============================================================
    call          when                            what it does
    ============  ==============================  ===============================================================
    ``prepare``   before every backward           parameters without ``.grad`` get their zeroed slice as gradient;
                                                  averages already held are scaled back to a ``1/N`` share
    ``arrived``   a gradient was accumulated      counts it; True when the whole bucket has arrived (overlap)
    ``start``     end of backward (or on arrival  writes the per-parameter flags and the stop flag into the tail,
                  with overlap)                   starts the sum over ranks
    ``finish``    end of backward                 waits, hands the averaged slices out as gradients (``None``
                                                  where no rank had one), delivers the stop flag
    ============  ==============================  ===============================================================

    Per-step fields: ``received`` (a gradient arrived since the last sum), ``carried`` (the parameter still holds
    the last sum's slice), ``reduced`` (the slices hold averages not yet scaled back), and the arrival count.
    """

    def __init__(self, bucket: Bucket, comm: Communicator) -> None:
        self.bucket = bucket
        self.size = comm.size
        #: which parameters autograd accumulated a gradient into since the last allreduce (post-accumulate hooks)
        self.received = [False] * len(bucket.tensors)
        #: which parameters still hold the gradient the last allreduce gave them (not set to ``None`` since)
        self.carried = [False] * len(bucket.tensors)
        #: the views hold gradients averaged by the last allreduce (not yet zeroed or scaled back)
        self.reduced = False
        #: which parameters received their gradient in the current backward, and how many have not yet
        self._arrived = [False] * len(bucket.tensors)
        self._waiting = len(bucket.tensors)
        self._in_bucket = False
        self._reduce = comm.prepared_allreduce(bucket.flat, "sum")
        # Flags are written through numpy where the tail is in host memory: ~1 µs instead of ~5 for torch.
        self._tail = (
            bucket.tail.numpy() if bucket.tail.device.type == "cpu" and bucket.tail.dtype in _NUMPY_DTYPES else None
        )

    def prepare(self) -> None:
        """Before a backward: hand the bucket's views to autograd as gradients where there are none."""
        params, views = self.bucket.tensors, self.bucket.views
        missing = [i for i, p in enumerate(params) if p.grad is None]
        with torch.no_grad():
            if len(missing) == len(params):
                self.bucket.flat.zero_()
            else:
                if self.reduced:  # a second synchronised backward before the step: count the average once
                    self.bucket.flat.mul_(1.0 / self.size)
                for i in missing:
                    views[i].zero_()
            for i in missing:
                params[i].grad = views[i]
                self.carried[i] = False
        self.reduced = False
        self._arrived = [False] * len(params)
        self._waiting = len(params)

    def arrived(self, index: int) -> bool:
        """Note that parameter ``index`` received a gradient; whether that made the bucket complete."""
        self.received[index] = True
        if self._arrived[index]:
            return False
        self._arrived[index] = True
        self._waiting -= 1
        return self._waiting == 0

    @property
    def complete(self) -> bool:
        """Every parameter of the bucket received its gradient in this backward."""
        return self._waiting == 0

    def start(self, flags: FlagChannel, background: bool) -> None:
        """Start summing the bucket over ranks (on the background thread, or now), with this rank's gradient flags
        and ``flags``' outgoing value in its tail."""
        bucket = self.bucket
        params = bucket.tensors
        grads = [p.grad for p in params]
        # The usual step: autograd accumulated every gradient into the bucket, so the flags are all ones.
        self._in_bucket = all(self.received) and all(g is v for g, v in zip(grads, bucket.views))
        tail = [1.0] * len(params) if self._in_bucket else self._gather_strays(grads)
        tail.append(1.0 if flags.outgoing else 0.0)
        if self._tail is not None:
            self._tail[:] = tail
        else:
            bucket.tail.copy_(torch.tensor(tail))
        # a plain sum of gradients already divided by N: see GradientAllreduce.loss_scale
        (self._reduce.start if background else self._reduce.run)()

    def finish(self, flags: FlagChannel) -> None:
        """Wait for the started sum and hand out the averaged gradients."""
        bucket, received = self.bucket, self.received
        params = bucket.tensors
        self._reduce.wait()
        self.reduced = True
        received[:] = [False] * len(received)
        *counts, flagged = (self._tail if self._tail is not None else bucket.tail).tolist()  # sums of 0/1 flags
        flags.deliver(flagged)
        if self._in_bucket:  # every count is at least our own 1: the averaged gradients already are the views
            self.carried[:] = [True] * len(self.carried)
            return
        for i, (p, view, count) in enumerate(zip(params, bucket.views, counts)):
            # The averaged gradient is handed out as a view of the bucket: no copy back.
            p.grad = view if count > 0 else None
            self.carried[i] = count > 0

    def _gather_strays(self, grads: list[Tensor | None]) -> list[float]:
        """Copy in gradients autograd did not accumulate into the bucket (``create_graph``, set by hand), zero
        the slices of parameters without a gradient, and return this rank's flags (1: has a gradient)."""
        views = self.bucket.views
        with torch.no_grad():
            pairs = [(v, g) for v, g in zip(views, grads) if g is not None and g.data_ptr() != v.data_ptr()]
            if pairs:
                torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
            flags = [
                0.0 if g is None or not (got or carried or g.data_ptr() != v.data_ptr()) else 1.0
                for g, got, carried, v in zip(grads, self.received, self.carried, views)
            ]
            for view, flag in zip(views, flags):
                if flag == 0.0:
                    view.zero_()
        return flags
