"""Hydra under mpirun: one output directory per job shared by all ranks, files written once, logs per rank.

Every rank runs the Hydra application. Left alone, ``${now:...}`` resolves per process (so ranks may pick
different run directories), and every rank writes ``.hydra/`` and appends to one log file.
:func:`mpi_hydra_main` replaces ``@hydra.main``:

- before Hydra starts, rank 0's run stamp is broadcast (or taken from ``LIGHTNING_MPI_RUN_STAMP``) and served
  by the ``${mpi_stamp:}`` resolver: use it in ``hydra.run.dir`` and ``hydra.sweep.dir``;
- under an MPI launcher, ranks > 0 get ``hydra.output_subdir=null``, log to ``<job>.rank<r>.log`` in the same
  job directory and print nothing to the console (Python warnings included); the overrides added for this
  are the same strings on every rank (the rank is read by resolvers), so ``multirun.yaml`` is identical on
  every rank;
- multirun must pair job ``i`` across ranks, which only the basic sweeper and launcher guarantee: others are
  refused with a clear error under MPI.

Resolvers only read values fixed before Hydra started: they never communicate.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning_mpi.comm import launched_by_mpi, launcher_rank

STAMP_VARIABLE = "LIGHTNING_MPI_RUN_STAMP"
_BASIC = {
    "sweeper": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "launcher": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
}
_RANK_OVERRIDES = (
    "hydra.output_subdir=${mpi_rank_zero_only:.hydra}",
    "hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/${hydra.job.name}${mpi_rank_suffix:}.log",
    "hydra.job_logging.root.handlers=${mpi_log_handlers:}",
)


def run_stamp() -> str:
    """This job's run stamp, the same on every rank (a collective under MPI the first time, unless set in env).

    Rank 0's local time (``YYYY-MM-DD_HH-MM-SS``) is broadcast and stored in ``LIGHTNING_MPI_RUN_STAMP``, so
    later calls, and child processes, reuse it.
    """
    stamp = os.environ.get(STAMP_VARIABLE)
    if not stamp:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        if launched_by_mpi():
            from lightning_mpi.comm import world

            stamp = world().broadcast_object(stamp, root=0)
        os.environ[STAMP_VARIABLE] = stamp
    return stamp


def _stamp_without_communicating() -> str:
    stamp = os.environ.get(STAMP_VARIABLE) or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    os.environ[STAMP_VARIABLE] = stamp
    return stamp


def register_resolvers() -> None:
    """Register ``mpi_stamp``, ``mpi_rank``, ``mpi_rank_suffix``, ``mpi_rank_zero_only`` and ``mpi_log_handlers``.

    ``${mpi_stamp:}`` needs :func:`run_stamp` to have run under MPI (otherwise it takes this process's time).
    """
    from omegaconf import OmegaConf

    rank = launcher_rank()
    resolvers: dict[str, Callable[..., Any]] = {
        "mpi_stamp": _stamp_without_communicating,
        "mpi_rank": lambda: rank,
        "mpi_rank_suffix": lambda: f".rank{rank}" if rank else "",
        "mpi_rank_zero_only": lambda value: value if rank == 0 else None,
        "mpi_log_handlers": lambda: ["console", "file"] if rank == 0 else ["file"],
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)


def check_sweep_plugins(hydra_config: Any) -> None:
    """Refuse sweepers and launchers other than Hydra's basic ones under MPI (job pairing across ranks)."""
    if not launched_by_mpi():
        return
    for kind, basic in _BASIC.items():
        node = hydra_config.get(kind)
        target = node.get("_target_") if node is not None else None
        if target is not None and target != basic:
            raise RuntimeError(
                f"hydra/{kind} {target} is not supported under mpirun: every rank runs the multirun itself and "
                f"job i must be the same job on every rank, which only Hydra's basic {kind} guarantees. "
                f"Drop the hydra/{kind} override, or run the sweep without mpirun."
            )


def _check_argv(argv: list[str]) -> None:
    for arg in argv:
        for kind in _BASIC:
            for prefix in (f"hydra/{kind}=", f"+hydra/{kind}=", f"++hydra/{kind}="):
                if arg.startswith(prefix) and arg[len(prefix) :] != "basic":
                    raise SystemExit(
                        f"error: {arg!r}: only the basic hydra/{kind} works under mpirun (job i must pair up "
                        "across ranks). Run this sweep without mpirun, or drop the override."
                    )


def mpi_hydra_main(
    config_path: str | None = None, config_name: str | None = None, version_base: str | None = "1.3"
) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Use in place of ``@hydra.main``; the same arguments. See the module documentation."""
    import hydra

    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def checked(cfg: Any) -> Any:
            from hydra.core.hydra_config import HydraConfig

            check_sweep_plugins(HydraConfig.get())
            if launcher_rank() > 0:
                logging.captureWarnings(True)  # into this rank's log file instead of the shared console
            return task(cfg)

        main = hydra.main(config_path=config_path, config_name=config_name, version_base=version_base)(checked)

        @functools.wraps(task)
        def entry() -> Any:
            if launched_by_mpi():
                _check_argv(sys.argv[1:])
                run_stamp()  # the only collective, before Hydra resolves anything
                sys.argv.extend(_RANK_OVERRIDES)
            register_resolvers()
            return main()

        return entry

    return decorate


def job_output_dir(cfg: Any) -> Path:
    """``cfg.output_dir`` if set, else the Hydra job's directory (the same on every rank); created if missing."""
    if cfg.get("output_dir"):
        path = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        path = Path(HydraConfig.get().runtime.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Readers see the old file or the complete new one, never a partial write."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
    os.replace(tmp, path)


def check_strategy_fits_job(strategy: object, ranks: int) -> None:
    """Refuse a one-process strategy (``strategy=single``) in a job of several MPI ranks: every rank would train
    alone on all the data and the results would claim ``ranks`` ranks."""
    from lightning_mpi.strategy import MPIStrategy

    if ranks > 1 and not isinstance(strategy, MPIStrategy):
        raise ValueError(
            f"strategy={type(strategy).__name__} runs one process, but this job has {ranks} MPI ranks: use "
            "strategy=allreduce, average or ensemble under mpirun, or run without mpirun."
        )
