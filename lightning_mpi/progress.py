"""Progress you can see when the console is not a terminal (``mpirun`` and Slurm with output to a file).

Lightning's progress bars redraw one line of a terminal. Under an MPI launcher the ranks' output reaches the
console through the launcher (Open MPI even gives each rank a pseudo-terminal, so the bar believes it has one), and
what arrives is blank lines; to a file, nothing useful either, so a job stays silent until it ends.
:class:`EpochLines` prints one line per training epoch from rank 0 instead, with the epoch, the global step, the
epoch's seconds and every logged scalar::

    epoch 3/10 | step 112 | 1.9 s | train_loss 0.0412 | val_loss 0.0398

Under an MPI launcher with several ranks, every Trainer with MPIStrategy gets it in place of Lightning's progress
bar (:func:`use_epoch_lines_under_a_launcher`, installed by ``import lightning_mpi``);
``Trainer(enable_progress_bar=False)`` keeps the console quiet, ``callbacks=[EpochLines(every_seconds=30)]`` adds
a line every 30 s within long epochs, and a progress bar you pass in ``callbacks`` is left alone.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch import Tensor
from typing_extensions import override


class EpochLines(TQDMProgressBar):
    """One line per training epoch (and every ``every_seconds`` within one, if given) on rank 0's stdout.

    A :class:`~lightning.pytorch.callbacks.TQDMProgressBar` whose bars count but never draw, so that code written for
    Lightning's default bar (``trainer.progress_bar_callback.train_progress_bar``, ``self.print``) keeps working;
    ``self.print`` / ``trainer.print`` go to stdout as plain lines.
    """

    def __init__(self, every_seconds: float | None = None) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self._epoch_started = 0.0
        self._last_line = 0.0

    @property
    @override
    def is_disabled(self) -> bool:
        # What Lightning's init_*_tqdm give their bars as ``disable``: they count but never draw (they would redraw
        # one terminal line), while the callback itself stays enabled (``is_enabled``: self.print, the lines).
        return True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._epoch_started = self._last_line = time.monotonic()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.every_seconds is None or time.monotonic() - self._last_line < self.every_seconds:
            return
        total = self.total_train_batches
        of = f"/{total}" if isinstance(total, int) else ""
        self._show(trainer, f"batch {batch_idx + 1}{of}", trainer.progress_bar_metrics)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Validation of this epoch has run by now: its metrics are in the line.
        self._show(trainer, f"{time.monotonic() - self._epoch_started:.1f} s", trainer.callback_metrics)

    @override
    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        if self.is_enabled:
            print(*args, sep=sep, end=kwargs.get("end", "\n"), flush=True)

    def _show(self, trainer: pl.Trainer, what: str, metrics: dict[str, Any]) -> None:
        self._last_line = time.monotonic()
        if not self.is_enabled or not trainer.is_global_zero:
            return
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}", f"step {trainer.global_step}", what]
        parts += [f"{name} {value}" for name, value in _scalars(metrics)]
        print(" | ".join(parts), flush=True)


def _as_list(callbacks: Any) -> list[Any]:
    return [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _scalars(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Logged scalars, formatted: 4 significant digits (integers as they are)."""
    shown = []
    for name, value in sorted(metrics.items()):
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        shown.append((name, str(value) if isinstance(value, int) or not math.isfinite(value) else f"{value:.4g}"))
    return shown


def use_epoch_lines_under_a_launcher(trainer: pl.Trainer, arguments: dict[str, Any]) -> None:
    """Give a Trainer with MPIStrategy :class:`EpochLines` instead of the progress bar Lightning added by default
    (installed for jobs of several ranks by ``import lightning_mpi``); a progress bar passed in ``callbacks`` is the
    user's choice and stays."""
    from lightning_mpi.strategy import MPIStrategy

    current = trainer.progress_bar_callback
    if not isinstance(trainer.strategy, MPIStrategy) or current in _as_list(arguments.get("callbacks")):
        return
    if type(current) not in (TQDMProgressBar, RichProgressBar):
        return
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]  # an attribute Lightning's types omit
    callbacks[callbacks.index(current)] = EpochLines()
