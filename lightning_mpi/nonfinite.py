"""What every rank does when some rank's gradients hold NaN or inf: the same decision on every rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info

if TYPE_CHECKING:
    from lightning_mpi.policies import SyncPolicy


class NonFiniteGradients:
    """What ``MPIStrategy(on_nonfinite=...)`` does when any rank's gradients hold NaN or inf after backward:
    ``"ignore"`` (the default; e.g. AMP's gradient scaler handles them), ``"skip"`` (every rank drops the step's
    gradients, so the optimizer does not move; listed in :attr:`skipped_steps`) or ``"raise"``
    (``FloatingPointError`` on every rank). The decision is the same on every rank."""

    CHOICES = ("ignore", "skip", "raise")

    def __init__(self, action: str) -> None:
        if action not in self.CHOICES:
            raise ValueError(f"on_nonfinite={action!r} is not known: choose 'ignore', 'skip' or 'raise'.")
        self.action = action
        #: global steps whose gradients were dropped because some rank's were not finite
        self.skipped_steps: list[int] = []

    def check(self, policy: SyncPolicy, module: LightningModule) -> None:
        """After a synchronised backward (a collective unless ignoring)."""
        if self.action == "ignore" or policy.gradients_finite(module):
            return
        step = module.trainer.global_step
        if self.action == "raise":
            raise FloatingPointError(f"Non-finite gradients at global step {step} on at least one rank.")
        module.zero_grad(set_to_none=True)
        self.skipped_steps.append(step)
        rank_zero_info(f"lightning-mpi: non-finite gradients at global step {step}; every rank skips this step.")
