"""What ranks other than 0 print to the shared console: nothing that lightning-mpi can keep to rank 0.

Under ``mpirun`` every rank runs the whole script, and the launcher merges their output into one console. Rank 0
prints; ranks > 0 would only repeat it. Where the package decides:

- Lightning's own messages (``Seed set to 0``, ``GPU available: ...``; most of them Lightning already prints on
  rank 0 only, once ``import lightning_mpi`` has told it the rank): ranks > 0 print their warnings and errors, not
  their information (:func:`quiet_information`, at import under a launcher);
- Hydra applications under :func:`lightning_mpi.hydra.mpi_hydra_main`: ranks > 0 print nothing, and log Python
  warnings, Lightning's messages and the application's logging to their ``<job>.rank<r>.log``; Hydra's own lines
  ("Launching 4 jobs locally", "#0 : model=lstm") come from rank 0 only.

Your own ``print`` runs on every rank: use ``trainer.print(...)`` (rank 0 of the Trainer) or Lightning's
``rank_zero_info`` / ``rank_zero_warn`` (``lightning.pytorch.utilities.rank_zero``).
"""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_mpi._lightning import lightning_loggers


class _WarningsAndErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_QUIET = _WarningsAndErrors()


def quiet_information(rank: int) -> None:
    """On ranks > 0, Lightning's console handlers drop records below ``WARNING``. Idempotent."""
    if rank == 0:
        return
    for logger in lightning_loggers():
        for handler in logger.handlers:
            if _QUIET not in handler.filters:
                handler.addFilter(_QUIET)


def hold_warnings(rank: int) -> None:
    """Ranks > 0, before a Hydra application configures logging: Python warnings become log records that nothing
    prints yet (rank 0 shows the same ones); once the job's logging is set up they reach the rank's log file."""
    if rank == 0:
        return
    logging.captureWarnings(True)
    held = logging.getLogger("py.warnings")
    if not any(isinstance(h, logging.NullHandler) for h in held.handlers):
        held.addHandler(logging.NullHandler())  # without any handler, logging's last resort would print them


def into_rank_log(rank: int) -> None:
    """Ranks > 0 of a Hydra job whose logging is configured: Python warnings and Lightning's messages go where the
    root logger sends them (the rank's log file), not to the console."""
    if rank == 0:
        return
    hold_warnings(rank)
    for logger in lightning_loggers():
        consoles = [h for h in logger.handlers if type(h) is logging.StreamHandler]  # not file handlers
        for handler in consoles:
            logger.removeHandler(handler)
        logger.propagate = True


def line_buffered_stdout() -> None:
    """Flush ``sys.stdout`` at every line, as Python already does ``sys.stderr``. Under a launcher stdout is a pipe,
    which Python buffers in blocks: ``trainer.print`` lines would reach the console after the log lines (stderr)
    that followed them, or only when the process ends."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)  # absent where stdout was replaced (captured, a notebook)
    if reconfigure is not None and not sys.stdout.line_buffering:
        reconfigure(line_buffering=True)


_ANNOUNCED: set[str] = set()


def announce_once(message: str) -> None:
    """Rank 0 prints ``message`` the first time only (fit, test and predict each set the environment up)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        rank_zero_info(message)
