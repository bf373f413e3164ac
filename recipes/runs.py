"""The runs behind a report: ``result.json`` files read, configurations told apart, repeated seeds aggregated.

Both report scripts (``report.py``, ``classify_report.py``) keep every configuration apart: two runs share a row
only if their configurations are equal apart from ``seed`` (and the keys in :data:`IGNORED`, which say where
files are, not what was run). Runs that differ only in their seed are aggregated: a cell holds the median and the
range over the seeds. Whatever cannot be placed (an unreadable file, a result of the other recipe, the same
configuration and seed twice) is reported in the warnings the loaders return.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Configuration keys that do not change what a run measures: where data and results live, plots, progress bars.
IGNORED = frozenset(
    {"output_dir", "plot", "data.path", "data.source.root", "trainer.enable_progress_bar", "trainer.default_root_dir"}
)
SEED = "seed"


@dataclass
class Run:
    """One ``result.json``: where it was found, what it holds, and its configuration flattened to dotted keys."""

    path: Path
    result: dict[str, Any]
    config: dict[str, Hashable] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get(SEED)

    def __getitem__(self, key: str) -> Any:
        return self.result[key]


def flatten(config: Any, prefix: str = "") -> dict[str, Hashable]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` as ``{"a.b": 1, "c": (1, 2)}`` (lists become tuples: values are compared).

    >>> flatten({"trainer": {"max_epochs": 3}, "model": {"sizes": [512, 256]}, "seed": 0})
    {'trainer.max_epochs': 3, 'model.sizes': (512, 256), 'seed': 0}
    """
    if isinstance(config, dict):
        flat: dict[str, Hashable] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(config, list):
        return {prefix[:-1]: tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for v in config)}
    return {prefix[:-1]: config}


def load_runs(
    paths: Iterable[str | Path], accept: Callable[[dict[str, Any]], str | None]
) -> tuple[list[Run], list[str]]:
    """Every ``result.json`` given, or found below the given directories, that ``accept`` takes (it returns
    ``None``, or why a result does not belong here); and a warning for each file left out.

    Raises ``FileNotFoundError`` if there is no ``result.json`` at all.
    """
    files: list[Path] = []
    unfinished: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.rglob("result.json"))
            unfinished += jobs_without_result(path)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist.")
    if not files:
        raise FileNotFoundError(
            f"No result.json under {', '.join(map(str, paths))}: point the report at a run or multirun directory."
        )
    runs: list[Run] = []
    warnings = [
        f"no result.json in job directory {job}: the job failed or has not finished (see its log)" for job in unfinished
    ]
    for file in files:
        try:
            result = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            warnings.append(f"skipped {file}: not readable as JSON ({error})")
            continue
        reason = accept(result) if isinstance(result, dict) else "not a result object"
        if reason:
            warnings.append(f"skipped {file}: {reason}")
            continue
        if not isinstance(result.get("config"), dict):
            warnings.append(f"{file} holds no configuration: it is told apart from other runs by its summary only")
        runs.append(Run(file, result, flatten(result.get("config") or {})))
    return runs, warnings


def jobs_without_result(root: Path) -> list[Path]:
    """Hydra job directories (those holding ``.hydra/``) under ``root`` without a ``result.json``.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for job in ("0", "1"):
    ...     (root / job / ".hydra").mkdir(parents=True)
    >>> _ = (root / "0" / "result.json").write_text("{}")
    >>> [p.name for p in jobs_without_result(root)]
    ['1']
    """
    return sorted(hydra.parent for hydra in root.rglob(".hydra") if not (hydra.parent / "result.json").exists())


def varying_keys(runs: Sequence[Run], within: Callable[[Run], Hashable]) -> list[str]:
    """Configuration keys (``seed`` and :data:`IGNORED` aside) whose values differ between runs that ``within``
    puts together: what tells those runs apart besides what ``within`` already shows. A key that some of them lack
    counts as differing."""
    groups: dict[Hashable, list[Run]] = defaultdict(list)
    for run in runs:
        groups[within(run)].append(run)
    keys: set[str] = set()
    for members in groups.values():
        every = set().union(*(r.config for r in members))
        for key in every - IGNORED - {SEED}:
            if len({repr(r.config.get(key, _MISSING)) for r in members}) > 1:
                keys.add(key)
    return sorted(keys)


_MISSING = "<missing>"


def setting(run: Run, keys: Sequence[str]) -> tuple[tuple[str, Hashable], ...]:
    """``run``'s values of ``keys``, as a hashable row key."""
    return tuple((key, run.config.get(key, _MISSING)) for key in keys)


def describe(values: Sequence[tuple[str, Hashable]]) -> str:
    """``trainer.max_epochs=20, data.batch_size=64`` (empty if no keys)."""
    return ", ".join(f"{key}={value}" for key, value in values)


def repeated_seeds(runs: Sequence[Run], key: Callable[[Run], Hashable]) -> list[str]:
    """A warning for every group of runs with the same row key and the same seed: a rerun, counted twice."""
    seen: dict[tuple[Hashable, Any], list[Run]] = defaultdict(list)
    for run in runs:
        seen[(key(run), repr(run.seed))].append(run)
    return [
        f"{len(same)} runs of the same configuration with seed {same[0].seed} (all counted): "
        + ", ".join(str(r.path.parent) for r in same)
        for same in seen.values()
        if len(same) > 1
    ]


@dataclass
class Spread:
    """Median and range of one quantity over runs (seeds)."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def format(self, fmt: str = "{:,.0f}", scale: float = 1.0, unit: str = "") -> str:
        """``7,727`` for one run (or equal values), ``7,727 [7,713-7,865]`` for several (median [min-max]).

        >>> Spread([7713.0, 7865.0, 7727.0]).format()
        '7,727 [7,713-7,865]'
        >>> Spread([0.9825]).format("{:.2f}", scale=100, unit=" %")
        '98.25 %'
        >>> Spread([8261.7, 8261.7]).format()  # the same value from every seed
        '8,262'
        """
        median = fmt.format(scale * self.median)
        if self.low == self.high:  # one run, or the same value from every seed
            return median + unit
        return f"{median} [{fmt.format(scale * self.low)}-{fmt.format(scale * self.high)}]{unit}"


def spread(runs: Iterable[Run], read: Callable[[Run], float]) -> Spread:
    return Spread([float(read(r)) for r in runs])


def seeds_text(runs: Sequence[Run]) -> str:
    """The seeds of ``runs``, compactly: ``0-4``, ``0, 2, 7`` or ``?`` where a configuration lacks one.

    >>> seeds_text([Run(Path("r"), {}, {"seed": s}) for s in (3, 0, 1, 2)])
    '0-3'
    """
    seeds = [r.seed for r in runs]
    if any(not isinstance(s, int) for s in seeds):
        return ", ".join("?" if s is None else str(s) for s in seeds)
    unique = sorted(set(seeds))
    if len(unique) > 2 and unique == list(range(unique[0], unique[-1] + 1)) and len(unique) == len(seeds):
        return f"{unique[0]}-{unique[-1]}"
    return ", ".join(map(str, sorted(seeds)))


def shown(path: Path) -> str:
    """``path`` as a person would type it from here: relative to the working directory when below it.

    >>> shown(Path.cwd() / "outputs" / "run")
    'outputs/run'
    >>> shown(Path("/elsewhere/run"))
    '/elsewhere/run'
    >>> shown(Path.cwd()) == str(Path.cwd())  # inside the job's own directory (hydra.job.chdir=True)
    True
    """
    path = Path(path).absolute()
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(path) if relative == Path(".") else str(relative)  # "." says nothing (hydra.job.chdir=True)


def warn(messages: Iterable[str]) -> None:
    """Print each message to stderr as ``warning: ...``."""
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)
