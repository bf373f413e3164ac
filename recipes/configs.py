"""The recipes' configuration schemas, stored in Hydra's ConfigStore (see each recipe's ``conf/``).

Each recipe composes its own config tree, so a group option of the other recipe (``train.py model=cnn``) is
refused when the configuration is composed, with the valid choices. The schemas type the top-level keys, the
Trainer's and each model's (derived from the model class's signature), so ``trainer.max_epochs=abc``,
``model.hidden_size=fifty`` or a misspelt key fails there too.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

from omegaconf import MISSING

from lightning_mpi.hydra import register_configs


@dataclass
class TrainerConfig:
    """Keyword arguments of ``lightning.pytorch.Trainer`` (the recipes add strategy, logger and callbacks)."""

    accelerator: str = "cpu"
    devices: int = 1
    max_epochs: int = 100
    enable_progress_bar: bool = True  # rank 0 only under MPI
    log_every_n_steps: int = 50
    num_sanity_val_steps: int = 0
    limit_train_batches: Optional[float] = None  # noqa: UP045 - OmegaConf reads Optional, not X | None, on Python 3.10
    gradient_clip_val: Optional[float] = None  # noqa: UP045


def trainer_options(trainer: Any) -> dict[str, Any]:
    """``cfg.trainer`` as keyword arguments of Lightning's Trainer, each checked against the Trainer's signature:
    Hydra's ``+trainer.key=value`` adds keys the schema does not type, and a misspelt one would otherwise end in a
    ``TypeError`` deep in ``Trainer.__init__``.

    >>> trainer_options({"max_epochs": 3})
    {'max_epochs': 3}
    >>> trainer_options({"max_epoch": 3})
    Traceback (most recent call last):
    ...
    ValueError: trainer.max_epoch is not an argument of Lightning's Trainer; did you mean trainer.max_epochs?
    """
    import difflib
    import inspect

    from lightning.pytorch import Trainer
    from omegaconf import DictConfig, OmegaConf

    options = OmegaConf.to_container(trainer, resolve=True) if isinstance(trainer, DictConfig) else dict(trainer)
    assert isinstance(options, dict)
    known = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean trainer.{close[0]}?" if close else " (see lightning.pytorch.Trainer's arguments)."
            raise ValueError(f"trainer.{key} is not an argument of Lightning's Trainer{hint}")
    return {str(k): v for k, v in options.items()}


@dataclass
class ForecastingConfig:
    """recipes/forecasting/train.py: forecasting daily case counts."""

    name: str = "forecast"
    seed: int = 0
    # torch threads of a one-process run: these small recurrent nets run fastest on one (2 threads were 15x slower on
    # a busy 2-core machine); MPIStrategy chooses its own
    threads: Optional[int] = 1  # noqa: UP045
    output_dir: Optional[str] = None  # noqa: UP045 - None: Hydra's run directory (the job's directory in a sweep)
    plot: bool = True  # rank 0 writes forecast.png next to result.json
    model: Any = MISSING
    data: Any = MISSING
    strategy: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class Mode(Enum):
    train = "train"  # one model or ensemble trained by all ranks
    kfold = "kfold"  # folds dealt to the ranks


@dataclass
class KFoldConfig:
    folds: int = 10


@dataclass
class ClassificationConfig:
    """recipes/classification/train.py: CNN ensembles, data-parallel MLPs, parallel k-fold."""

    name: str = "classify"
    mode: Mode = Mode.train
    seed: int = 0
    output_dir: Optional[str] = None  # noqa: UP045 - None: Hydra's run directory
    kfold: KFoldConfig = field(default_factory=KFoldConfig)
    model: Any = MISSING
    data: Any = MISSING
    strategy: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


#: Where a run and a sweep write (one directory per job, shared by all ranks: ``${mpi_stamp:}``).
OUTPUT_DIRS = {
    "hydra": {
        "run": {"dir": "outputs/${name}/${mpi_stamp:}"},
        "sweep": {"dir": "multirun/${name}/${mpi_stamp:}", "subdir": "${hydra.job.num}_${hydra.job.override_dirname}"},
        "job": {
            "config": {
                "override_dirname": {
                    "exclude_keys": [
                        "experiment",
                        "data.path",
                        "data.source.root",
                        "output_dir",
                        "hydra.sweep.dir",
                        "hydra.run.dir",
                    ]
                }
            }
        },
    }
}


_PLAIN_TYPES = (int, float, bool, str)


def _config_type(hint: Any) -> Any:
    """The OmegaConf type of an argument annotated ``hint``: plain types and Optional or sequences of them as they
    are, anything else (optimizer factories, transforms) untyped.

    >>> _config_type(int), _config_type(Optional[float]), _config_type(Sequence[int])
    (<class 'int'>, typing.Optional[float], typing.List[int])
    >>> _config_type(typing.Callable[..., Any])
    typing.Any
    """
    if hint in _PLAIN_TYPES:
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] in _PLAIN_TYPES:
            return Optional[inner[0]]  # noqa: UP045 - OmegaConf reads Optional
    if typing.get_origin(hint) in (list, Sequence) and args and args[0] in _PLAIN_TYPES:
        return typing.List[args[0]]  # type: ignore[valid-type]  # noqa: UP006 - OmegaConf reads typing.List
    return Any


def model_schema(cls: type, *, leave_out: tuple[str, ...] = ()) -> type:
    """A structured config of ``cls``'s constructor: ``_target_`` and every argument but ``leave_out`` (those the
    recipe passes itself), typed as annotated and with the same defaults; one source for a model's options.

    >>> Schema = model_schema(dataclasses.make_dataclass("Net", [("width", int, dataclasses.field(default=8))]))
    >>> [(f.name, f.type, f.default) for f in dataclasses.fields(Schema)][1:]
    [('width', <class 'int'>, 8)]
    """
    hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for name, parameter in inspect.signature(cls).parameters.items():
        if name in leave_out or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        kind = _config_type(hints.get(name, Any))
        default = parameter.default
        if default is parameter.empty:
            spec = field(default=MISSING)
        elif isinstance(default, (list, tuple)):
            spec = field(default_factory=lambda value=list(default): list(value))
        else:
            spec = field(default=default)
        fields.append((name, kind, spec))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def register() -> None:
    """Store the schemas, the Trainer's ``trainer/default`` and ``output_dirs`` (plus lightning-mpi's configs)."""
    from hydra.core.config_store import ConfigStore

    register_configs()
    store = ConfigStore.instance()
    store.store(name="forecasting_schema", node=ForecastingConfig)
    store.store(name="classification_schema", node=ClassificationConfig)
    store.store(group="trainer", name="default", node=TrainerConfig)
    for name, model in _models().items():
        store.store(group="model_schema", name=name, node=model)
    store.store(name="output_dirs", node=OUTPUT_DIRS, package="_global_")


def _models() -> dict[str, type]:
    """The schema of each model config, by the name its config file uses in its defaults list."""
    from recipes.classification.models import CNNClassifier, MLPClassifier
    from recipes.forecasting.models import BiLSTMForecaster, GRUForecaster, LSTMForecaster

    # window, horizon and transform come from the data module (recipes/forecasting/train.py passes them)
    forecaster = ("window", "horizon", "transform")
    return {
        "lstm": model_schema(LSTMForecaster, leave_out=forecaster),
        "bilstm": model_schema(BiLSTMForecaster, leave_out=forecaster),
        "gru": model_schema(GRUForecaster, leave_out=forecaster),
        "cnn": model_schema(CNNClassifier),
        "mlp": model_schema(MLPClassifier),
    }
