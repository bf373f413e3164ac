"""The Lightning internals lightning-mpi relies on, all in one place.

Lightning has no public way to do these few things. Each is used through a function here, and
``tests/test_lightning_internals.py`` fails on a Lightning version where one of them changed (pyproject's
``lightning`` range lists the versions tested).
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import RunningStage


def request_stop(trainer: Trainer) -> None:
    """Make Lightning stop after the current training batch as if this rank had received SIGTERM (every rank
    calls it at the same batch: the strategy agreed on it)."""
    trainer._signal_connector.received_sigterm = True


def uses_distributed_sampler(trainer: Trainer) -> bool:
    """``Trainer(use_distributed_sampler=...)``: whether the user lets Lightning (and us) shard the data."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def trainer_builds_distributed(trainer: Trainer) -> bool:
    """Whether the Trainer's strategy trains one model over several processes."""
    return bool(trainer._accelerator_connector.is_distributed)


def cached_predictions(trainer: Trainer) -> list[list[Any]]:
    """The predict loop's outputs, one list of batch outputs per dataloader (mutable in place)."""
    return trainer.predict_loop._predictions


def sampler_inside_wrapper(sampler: object) -> object | None:
    """The user's sampler inside Lightning's ``(Unrepeated)DistributedSamplerWrapper``, if ``sampler`` is one."""
    return getattr(getattr(sampler, "dataset", None), "_sampler", None)


def batch_sampler_inside_wrapper(batch_sampler: object) -> object:
    """The batch sampler inside Lightning's ``_IndexBatchSamplerWrapper`` (predict), else ``batch_sampler``."""
    return getattr(batch_sampler, "_batch_sampler", batch_sampler)


def replace_batch_sampler_inside_wrapper(wrapper: object, batch_sampler: object) -> None:
    wrapper._batch_sampler = batch_sampler  # type: ignore[attr-defined]


def attached_trainer(module: LightningModule | None) -> Trainer | None:
    """The Trainer ``module`` is attached to, or ``None``."""
    try:
        return module.trainer if module is not None else None
    except RuntimeError:  # "... is not attached to a `Trainer`."
        return None


def is_lightning_default(owner: object, parent: type, hook: str) -> bool:
    """Whether ``owner.hook`` is Lightning's own default: not overridden in a subclass, nor replaced or wrapped on
    the instance (a ``Mock``, a ``partial``), which Lightning's ``is_overridden`` would not notice."""
    return getattr(getattr(owner, hook, None), "__func__", None) is getattr(parent, hook)


def batch_hooks_are_lightnings(module: LightningModule) -> bool:
    """Whether the module's and its datamodule's ``transfer_batch_to_device`` and ``on_after_batch_transfer`` are
    Lightning's defaults (then a CPU batch needs no walk)."""
    from lightning.pytorch import LightningDataModule

    trainer = attached_trainer(module)
    datamodule = getattr(trainer, "datamodule", None)  # a property Lightning's types do not show
    owners = ((module, LightningModule), (datamodule, LightningDataModule))
    return all(
        is_lightning_default(owner, parent, hook)
        for owner, parent in owners
        if owner is not None
        for hook in ("transfer_batch_to_device", "on_after_batch_transfer")
    )


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (or ``optimizer`` itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def stage(module: LightningModule | None) -> RunningStage | None:
    """The stage of the Trainer ``module`` is attached to (``None``: none, or no loop running)."""
    trainer = attached_trainer(module)
    return trainer.state.stage if trainer is not None else None


def set_rank_zero(rank: int) -> None:
    """Tell Lightning's rank-zero utilities (``rank_zero_only``, ``rank_zero_info``, ...) this process's rank."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    # Lightning keeps the rank as an attribute of the function object, which its type does not declare.
    rank_zero_only.rank = utils_rank_zero_only.rank = rank  # type: ignore[attr-defined]


_AFTER_INIT: list[Callable[[Trainer, dict[str, Any]], None]] = []


def after_every_trainer_init(check: Callable[[Trainer, dict[str, Any]], None]) -> None:
    """Run ``check(trainer, keyword_arguments)`` after every ``Trainer.__init__`` of this process (each check once,
    in the order given)."""
    if check not in _AFTER_INIT:
        _AFTER_INIT.append(check)
    init = Trainer.__init__
    if getattr(init, "lightning_mpi", False):
        return

    @functools.wraps(init)
    def checked_init(trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        # As given: Lightning adds its default callbacks to the very list it was passed.
        given = {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        init(trainer, *args, **kwargs)
        for after in _AFTER_INIT:
            after(trainer, given)

    checked_init.lightning_mpi = True  # type: ignore[attr-defined]
    Trainer.__init__ = checked_init  # type: ignore[method-assign,assignment]


def keep_one_process_runs_away_from_mpi() -> None:
    """Make Lightning's ``MPIEnvironment.detect()`` answer ``False`` unless an MPI launcher started this process (or
    mpi4py has loaded MPI already). Idempotent.

    Every ``Trainer()`` asks each cluster environment whether it applies; Lightning's MPI environment answers by
    importing ``mpi4py.MPI``, which loads and initialises the MPI library even in a plain ``python train.py``, and
    fails ("cannot load MPI library") where mpi4py is installed without any MPI. Only a launcher's process can be
    one of several MPI ranks: elsewhere the answer is ``False`` without loading anything.
    """
    from lightning.fabric.plugins.environments import MPIEnvironment

    detect = MPIEnvironment.detect
    if getattr(detect, "lightning_mpi", False):
        return

    def detect_only_under_a_launcher() -> bool:
        from lightning_mpi.comm import launched_by_mpi

        return (launched_by_mpi() or "mpi4py.MPI" in sys.modules) and detect()

    detect_only_under_a_launcher.lightning_mpi = True  # type: ignore[attr-defined]
    detect_only_under_a_launcher.__wrapped__ = detect  # type: ignore[attr-defined]
    MPIEnvironment.detect = staticmethod(detect_only_under_a_launcher)  # type: ignore[method-assign]


#: Lightning's own warnings that say nothing to a user of lightning-mpi and that Lightning does not filter itself:
#: (message regex, category, module regex). Lightning 2.6 still builds ``torch.utils._pytree.LeafSpec``, which
#: recent torch releases deprecate (a ``FutureWarning`` at the first ``trainer.predict``).
FOREIGN_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)


def ignore_foreign_warnings() -> None:
    """Filter :data:`FOREIGN_WARNINGS` (the filters match only those messages, from those modules)."""
    for message, category, module in FOREIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def ignore_srun_hint() -> None:
    """Under an MPI launcher, filter Lightning's "The `srun` command is available on your system but is not used"
    (its hint, plain ``srun python ...``, would start worlds of one rank: see README's Slurm section)."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings(
        "ignore", message="The `srun` command is available on your system", category=PossibleUserWarning
    )


def lightning_loggers() -> list[logging.Logger]:
    """The loggers Lightning prints through (``Seed set to 0``, ``GPU available: ...``). Lightning gives each a
    console handler of its own (the subpackages' only when the root logger had none when Lightning was imported;
    the ``lightning`` package's always, which its subpackages reach once they propagate)."""
    return [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric")]
