"""Synchronised BatchNorm on any device, over torch.distributed (the ``"mpi4py"`` group under MPIStrategy).

torch's ``SyncBatchNorm`` refuses CPU tensors. :class:`SyncBatchNorm` here computes the same thing with plain tensor
operations: in training, the statistics of the global batch (every rank's samples) in forward, and in backward
the matching input gradients (the sums over the global batch that the statistics' gradients need), so that data
parallel training with it equals one process on the concatenated batches. ``Trainer(sync_batchnorm=True)`` under
MPIStrategy swaps every ``BatchNorm*d`` for it (:class:`MPISyncBatchNorm`, a Lightning ``LayerSync``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import Tensor
from torch.autograd.function import FunctionCtx
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_mpi.policies import SyncPolicy


class SyncBatchNorm(_BatchNorm):
    """``BatchNorm*d`` whose training statistics cover every rank of ``process_group`` (default: the whole job).

    Each rank may hold a different number of samples; the statistics weigh every sample alike. Evaluation uses the
    running statistics, which every rank updates identically.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    @override
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2 dimensions (batch, channels, ...), got {input.dim()}.")

    @override
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch = self.training or not self.track_running_stats
        if not use_batch or not dist.is_initialized() or dist.get_world_size(self.process_group) == 1:
            return super().forward(input)
        momentum = self._momentum()
        running_mean = self.running_mean if self.training and self.track_running_stats else None
        running_var = self.running_var if self.training and self.track_running_stats else None
        return _SyncBatchNormFunction.apply(  # type: ignore[no-any-return,no-untyped-call]
            input, self.weight, self.bias, running_mean, running_var, self.eps, momentum, self.process_group
        )

    def _momentum(self) -> float:
        if not (self.training and self.track_running_stats and self.num_batches_tracked is not None):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    @classmethod
    def convert(cls, module: Module, process_group: Any = None) -> Module:
        """``module`` with every ``BatchNorm*d`` (torch's ``SyncBatchNorm`` too) replaced by this class, state kept."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            converted: Module = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            _copy_state(module, converted)
            converted._original_class = type(module)  # type: ignore[assignment]
            return converted
        for name, child in module.named_children():
            new = cls.convert(child, process_group)
            if new is not child:
                module.add_module(name, new)
        return module

    @classmethod
    def revert(cls, module: Module) -> Module:
        """Undo :meth:`convert`: each layer back to the class it was, state kept."""
        if isinstance(module, cls):
            original = getattr(module, "_original_class", torch.nn.BatchNorm2d)
            reverted: Module = original(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            _copy_state(module, reverted)
            return reverted
        for name, child in module.named_children():
            new = cls.revert(child)
            if new is not child:
                module.add_module(name, new)
        return module


def _copy_state(source: Module, target: Module) -> None:
    with torch.no_grad():
        if getattr(source, "affine", False):
            target.weight = source.weight
            target.bias = source.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(source, name, None) is not None:
                setattr(target, name, getattr(source, name))
    target.train(source.training)
    target.to(next((t.device for t in source.state_dict().values()), torch.device("cpu")))


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        group: Any,
    ) -> Tensor:
        channels = input.shape[1]
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        # One reduction: sums, sums of squares and the sample count of every rank (counts may differ).
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        dist.all_reduce(stats, group=group)
        total = stats[-1]
        if float(total) < 2:
            raise ValueError(f"Expected more than 1 value per channel in training over all ranks, got {int(total)}.")
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (total / (total - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight, total)  # type: ignore[arg-type]  # None is allowed
        ctx.group = group  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        xhat, invstd, weight, total = ctx.saved_tensors
        channels = xhat.shape[1]
        dims = [d for d in range(xhat.dim()) if d != 1]
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        dy = grad_output.to(xhat.dtype)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_bias = sum_dy.clone() if ctx.has_bias else None
        # The statistics came from every rank: so do the parts of the input gradient that flow through them.
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=ctx.group)
        mean_dy = (sums[:channels] / total).view(shape)
        mean_dy_xhat = (sums[channels:] / total).view(shape)
        scale = invstd.view(shape) * (weight.view(shape) if weight is not None else 1.0)
        grad_input = scale * (dy - mean_dy - xhat * mean_dy_xhat)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        return grad_input.to(grad_output.dtype), grad_weight, grad_bias, None, None, None, None, None


class MPISyncBatchNorm(LayerSync):
    """``Trainer(sync_batchnorm=True)`` under MPIStrategy: :class:`SyncBatchNorm` for every ``BatchNorm*d``."""

    @override
    def apply(self, model: Module) -> Module:
        return SyncBatchNorm.convert(model)

    @override
    def revert(self, model: Module) -> Module:
        return SyncBatchNorm.revert(model)


def layer_sync_for(policy: SyncPolicy, layer_sync: LayerSync) -> MPISyncBatchNorm:
    """The layer sync ``Trainer(sync_batchnorm=True)`` gets under MPIStrategy with ``policy``: ours on every device
    (Lightning's ``TorchSyncBatchNorm`` refuses CPU tensors); refused where members normalise over their own data."""
    if policy.evaluates_all_samples:
        raise ValueError(
            f"Trainer(sync_batchnorm=True) does not apply to MPIStrategy(sync={policy.name!r}): every member "
            "normalises over its own data. Remove sync_batchnorm=True, or use sync='allreduce'."
        )
    return layer_sync if isinstance(layer_sync, MPISyncBatchNorm) else MPISyncBatchNorm()
