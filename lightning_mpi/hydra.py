"""Hydra under mpirun: one output directory per job shared by all ranks, files written once, logs per rank.

Needs hydra-core (``pip install "lightning-mpi[hydra]"``; the ``recipes`` extra has it); importing this module does
not import Hydra, its functions do.

Every rank runs the Hydra application. Left alone, ``${now:...}`` resolves per process (so ranks may pick
different run directories), and every rank writes ``.hydra/`` and appends to one log file.
:func:`mpi_hydra_main` replaces ``@hydra.main``:

- before Hydra starts, rank 0's run stamp is broadcast (or taken from ``LIGHTNING_MPI_RUN_STAMP``) and served
  by the ``${mpi_stamp:}`` resolver: use it in ``hydra.run.dir`` and ``hydra.sweep.dir``;
- the ``mpi_hydra`` config (add ``- mpi_hydra`` to the defaults list): under an MPI launcher, ranks > 0 get
  ``hydra.output_subdir=null``, log to ``<job>.rank<r>.log`` in the same job directory and print nothing to the
  console (Python warnings, Lightning's messages and Hydra's sweep lines included: see
  :mod:`lightning_mpi.console`); its values are the same strings on every rank (the rank is read by resolvers),
  so ``multirun.yaml`` is identical on every rank;
- the ``lightning_mpi/strategy_schema`` config: the typed schema of :class:`~lightning_mpi.MPIStrategy`'s arguments,
  for an application's strategy configs to extend (``defaults: [/lightning_mpi/strategy_schema@_here_]``), so
  that a misspelt key fails when the configuration is composed; not a strategy to choose, so ``--help`` does not
  offer it as one;
- multirun must pair job ``i`` across ranks, which only the basic sweeper and launcher guarantee: others are
  refused with a clear error under MPI;
- sweeps as Slurm jobs: ``python train.py -m hydra/launcher=submitit_slurm ...`` (hydra-submitit-launcher) runs
  the sweep in this one process, which submits each job once; every job's tasks run the job under ``srun`` with
  an MPI plugin. The per-rank settings of ``mpi_hydra`` are resolved in each task, so each job's files are still
  written once (resolvers are registered in the job's processes too);
- an exception the task raises on some ranks only ends the job; one that every rank raises alike is printed in
  full by one rank, the others say which (Hydra alone would print it once per rank);
- a launch whose processes do not form one MPI world (``srun -n 2`` without ``--mpi``) stops before Hydra
  writes anything (see :func:`lightning_mpi.checks.check_launcher_agrees`).

Resolvers only read values fixed before Hydra started: they never communicate.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from lightning_mpi import console
from lightning_mpi.comm import launched_by_mpi, launcher_rank

STAMP_VARIABLE = "LIGHTNING_MPI_RUN_STAMP"
_BASIC = {
    "sweeper": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "launcher": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
}
# hydra-submitit-launcher's launcher and the variable submitit's batch script exports before it runs srun.
_SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
_SUBMITIT_VARIABLE = "SUBMITIT_EXECUTOR"
#: Per-rank output settings (the ``mpi_hydra`` config): only rank 0 writes ``.hydra/`` and prints to the console.
PER_RANK_HYDRA = {
    "hydra": {
        "output_subdir": "${mpi_rank_zero_only:.hydra}",
        "hydra_logging": {"root": {"handlers": "${mpi_hydra_log_handlers:}"}},  # "Launching N jobs", "#i : ..."
        "job_logging": {
            "handlers": {"file": {"filename": "${hydra.runtime.output_dir}/${hydra.job.name}${mpi_rank_suffix:}.log"}},
            "root": {"handlers": "${mpi_log_handlers:}"},
        },
    }
}


@dataclass
class MPIStrategyConfig:
    """The arguments of :class:`~lightning_mpi.MPIStrategy` (the ``lightning_mpi/strategy_schema`` config).

    The mode's options (``every_n_steps`` ... ``pseudo_gradient_dtype``, owned by the policy classes of
    :mod:`lightning_mpi.policies`) are ``None`` here when not given: :func:`mpi_strategy` passes on only those
    given, so each keeps its policy's default, and one given to the wrong mode is refused by name.
    """

    _target_: str = "lightning_mpi.hydra.mpi_strategy"
    sync: str = "allreduce"
    every_n_steps: Optional[int] = None  # noqa: UP045 - OmegaConf reads Optional, not X | None, on Python 3.10
    every_n_epochs: Optional[int] = None  # noqa: UP045
    warmup_steps: Optional[int] = None  # noqa: UP045
    average_optimizer_state: Optional[bool] = None  # noqa: UP045
    voting: Optional[str] = None  # noqa: UP045
    seed: Optional[int] = None  # noqa: UP045
    bucket_mb: Optional[float] = None  # noqa: UP045
    overlap: Optional[bool] = None  # noqa: UP045
    outer_optimizer: Any = None  # a factory: _target_ and _partial_: true (DiLoCo)
    pseudo_gradient_dtype: Optional[str] = None  # noqa: UP045
    num_threads: Optional[int] = None  # noqa: UP045
    timeout: Optional[float] = 600.0  # noqa: UP045
    on_nonfinite: str = "ignore"
    fast_tensor_batches: bool = True


def mpi_strategy(sync: str = "allreduce", **arguments: Any) -> Any:
    """:class:`~lightning_mpi.MPIStrategy` from the schema's fields: the mode options left ``None`` are not given."""
    from lightning_mpi.policies import POLICIES, options_of
    from lightning_mpi.strategy import MPIStrategy

    options = {option for policy in POLICIES.values() for option in options_of(policy)}
    given = {k: v for k, v in arguments.items() if not (k in options and v is None)}
    return MPIStrategy(sync, **given)


def register_configs() -> None:
    """Store ``mpi_hydra`` and ``lightning_mpi/strategy_schema`` in Hydra's ConfigStore (see the module
    documentation)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="mpi_hydra", node=PER_RANK_HYDRA, package="_global_")
    # Not in the "strategy" group: it is the schema strategy configs extend, not a strategy to choose.
    store.store(group="lightning_mpi", name="strategy_schema", node=MPIStrategyConfig)


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
    """Register ``mpi_stamp``, ``mpi_rank_suffix``, ``mpi_rank_zero_only`` and ``mpi_log_handlers``.

    ``${mpi_stamp:}`` needs :func:`run_stamp` to have run under MPI (otherwise it takes this process's time).
    """
    from omegaconf import OmegaConf

    # The rank is read when a value is resolved: in a submitit job, that is in each of srun's tasks.
    resolvers: dict[str, Callable[..., Any]] = {
        "mpi_stamp": _stamp_without_communicating,
        "mpi_rank_suffix": lambda: f".rank{launcher_rank()}" if launcher_rank() else "",
        "mpi_rank_zero_only": lambda value: value if launcher_rank() == 0 else None,
        "mpi_log_handlers": lambda: ["console", "file"] if launcher_rank() == 0 else ["file"],
        "mpi_hydra_log_handlers": lambda: ["console"] if launcher_rank() == 0 else [],
    }
    for name, resolver in resolvers.items():
        # The stamp is cached as Hydra's ${now:} is: a launcher that composes each job's configuration again
        # (submitit, in the job's processes) copies the cache, so jobs see the sweep's stamp even where the
        # environment variable did not travel. Rank values are never cached: they differ between processes.
        OmegaConf.register_new_resolver(name, resolver, replace=True, use_cache=name == "mpi_stamp")


class _RegisterResolvers:
    """Registers the resolvers when called, and wherever it is unpickled.

    Launchers that run jobs in other processes (submitit) pickle the task function with its closure and resolve
    the job's configuration (``${mpi_stamp:}`` in the sweep directory, the per-rank overrides) before calling it.
    """

    def __call__(self) -> None:
        register_resolvers()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_registered_resolvers, ())


def _registered_resolvers() -> _RegisterResolvers:
    register_resolvers()
    return _RegisterResolvers()


def in_submitit_slurm_job(hydra_config: Any) -> bool:
    """Whether this process is a task of a job that hydra-submitit-launcher's Slurm launcher submitted: its sweep
    ran in one process, which submitted every job once, so job ``i`` is the same job on every rank by construction."""
    launcher = hydra_config.get("launcher")
    target = launcher.get("_target_") if launcher is not None else None
    return target == _SUBMITIT_SLURM and os.environ.get(_SUBMITIT_VARIABLE) == "slurm"


def check_sweep_plugins(hydra_config: Any) -> None:
    """Refuse sweepers and launchers other than Hydra's basic ones under MPI (job pairing across ranks), except in
    the tasks of a job submitted by submitit's Slurm launcher."""
    if not launched_by_mpi() or in_submitit_slurm_job(hydra_config):
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


def _chosen(argv: list[str], kind: str) -> str | None:
    """The ``hydra/<kind>`` option chosen on the command line, if any."""
    for arg in argv:
        for prefix in (f"hydra/{kind}=", f"+hydra/{kind}=", f"++hydra/{kind}="):
            if arg.startswith(prefix):
                return arg[len(prefix) :]
    return None


def _check_argv(argv: list[str]) -> None:
    for kind in _BASIC:
        chosen = _chosen(argv, kind)
        if chosen is None or chosen == "basic":
            continue
        if kind == "launcher" and chosen.startswith("submitit"):
            raise SystemExit(
                f"error: 'hydra/launcher={chosen}' under an MPI launcher: every rank would submit every job. Run "
                f"the sweep in one process, without mpirun or srun (python train.py -m hydra/launcher={chosen} ...); "
                "each job then runs its ranks under srun with an MPI plugin (see README, Slurm)."
            )
        raise SystemExit(
            f"error: 'hydra/{kind}={chosen}': only the basic hydra/{kind} works under mpirun (job i must pair up "
            "across ranks). Run this sweep without mpirun, or drop the override."
        )


def _export_script_directory() -> None:
    """Let the processes a launcher starts for the jobs (submitit's) import what the application imports from the
    directory Python put first on ``sys.path``: the script's (``python train.py``) or the working directory
    (``python -m package``)."""
    started_from_a_file = bool(sys.argv and sys.argv[0] and os.path.isfile(sys.argv[0]))
    if not started_from_a_file or not sys.path:
        return
    first = os.path.abspath(sys.path[0] or ".")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if first not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([first, *paths])


def _check_per_rank_settings(hydra_config: Any) -> None:
    """Refuse, under several MPI ranks, an application whose configuration lacks ``mpi_hydra``: every rank would
    write ``.hydra/`` and append to one log file."""
    if launcher_rank() > 0 and hydra_config.get("output_subdir") is not None:
        raise RuntimeError(
            "This Hydra application runs on several MPI ranks, but its configuration does not include lightning-mpi's "
            "per-rank output settings: add `- mpi_hydra` to the defaults list of its primary config (every rank would "
            "otherwise write .hydra/ and the same log file)."
        )


def _check_launch(in_task: bool) -> None:
    """Stop now if this launch's processes do not form one MPI world (``srun -n 2`` without ``--mpi``): each would
    run the whole application alone. Before Hydra writes anything from the command line (a clean message); at
    the start of the task in a job a launcher started elsewhere (an error that launcher reports)."""
    from lightning_mpi.checks import check_launcher_agrees

    if launched_by_mpi():
        from lightning_mpi.comm import world

        world()  # MPI's world, to compare with what the launcher says (run_stamp has created it from the command line)
    try:
        check_launcher_agrees()
    except RuntimeError as error:
        if in_task:
            raise
        raise SystemExit(f"error: {error}") from None


def _fail_together(error: Exception) -> None:
    """A task that raised under MPI: end the job unless every rank raised; where every rank raised the same
    exception, ranks other than the first to raise it exit quietly (Hydra would print it once per rank)."""
    if not launched_by_mpi():
        return
    from lightning_mpi.comm import world
    from lightning_mpi.failure import end_job_unless_every_rank_failed, said_instead_of_traceback

    comm = world()
    end_job_unless_every_rank_failed(comm, error)
    if said_instead_of_traceback(comm, error):
        raise SystemExit(1) from None


def mpi_hydra_main(
    config_path: str | None = None, config_name: str | None = None, version_base: str | None = "1.3"
) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Use in place of ``@hydra.main``; the same arguments. See the module documentation."""
    import hydra

    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        on_load = _RegisterResolvers()  # in this function's closure: a launcher that pickles it carries it along

        @functools.wraps(task)
        def checked(cfg: Any) -> Any:
            from hydra.core.hydra_config import HydraConfig

            on_load()
            hydra_config = HydraConfig.get()
            check_sweep_plugins(hydra_config)
            _check_per_rank_settings(hydra_config)
            if in_submitit_slurm_job(hydra_config):
                _check_launch(in_task=True)
            console.into_rank_log(launcher_rank())  # ranks > 0: into this rank's log file, not the shared console
            try:
                return task(cfg)
            except Exception as error:
                _fail_together(error)
                raise

        main = hydra.main(config_path=config_path, config_name=config_name, version_base=version_base)(checked)

        @functools.wraps(task)
        def entry() -> Any:
            mpi = launched_by_mpi()
            if mpi:
                console.hold_warnings(launcher_rank())  # until the job's logging can send them to the rank's log
                _check_argv(sys.argv[1:])
                run_stamp()  # the only collective, before Hydra resolves anything
            _check_launch(in_task=False)
            _export_script_directory()
            register_resolvers()
            register_configs()
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


def check_strategy_fits_job(strategy: object, ranks: int) -> None:
    """Refuse a one-process strategy (``strategy=single``) in a job of several MPI ranks: every rank would train
    alone on all the data and the results would claim ``ranks`` ranks."""
    from lightning_mpi.strategy import MPIStrategy

    if ranks > 1 and not isinstance(strategy, MPIStrategy):
        raise ValueError(
            f"strategy={type(strategy).__name__} runs one process, but this job has {ranks} MPI ranks: use "
            "strategy=allreduce, average or ensemble under mpirun, or run without mpirun."
        )
