"""Turn forecasting runs (``result.json`` files under a directory) into a table and a bar chart.

    python -m recipes.forecasting.report /tmp/forecast/covid_table [--out /tmp/forecast/covid_table]

Columns: the models (LSTM, BiLSTM, GRU). Rows: test RMSE and ``Trainer.fit`` time of every configuration found,
then the persistence and 7-day seasonal naive baselines on the same test targets. Every configuration keeps its own
row: without MPI (one process), with MPI (ranks and strategy), and any other setting that differs between the runs
(epochs, learning rate...). Runs that differ only in their seed share a cell: the median [min-max] over the seeds.
Files that cannot be placed are named in warnings. Writes ``table.md`` and ``table.png`` into ``--out`` (default:
the directory), prints the table and where it wrote it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_mpi.files import save_figure, write_atomically
from recipes.runs import (
    Run,
    Spread,
    describe,
    load_runs,
    repeated_seeds,
    seeds_text,
    setting,
    spread,
    varying_keys,
    warn,
)

MODELS = ("LSTM", "BiLSTM", "GRU")
REQUIRED = ("model", "strategy", "ranks", "metrics", "fit_seconds", "baselines")


def accept(result: dict[str, Any]) -> str | None:
    """``None`` for a forecasting result, else why it is not one."""
    if "mode" in result and "model" not in result:
        return "a classification result (recipes/classification/report.py reports those)"
    missing = [key for key in REQUIRED if key not in result]
    return f"not a forecasting result of recipes/forecasting/train.py (no {', '.join(missing)})" if missing else None


@dataclass(frozen=True)
class Row:
    """One configuration apart from the model: ranks, strategy and the other settings that tell runs apart."""

    ranks: int
    strategy: str
    setting: tuple[tuple[str, Hashable], ...]

    @property
    def label(self) -> str:
        """``without MPI``, ``with MPI, 2 ranks, average``, plus the other settings."""
        if self.ranks == 1 and self.strategy == "single":
            text = "without MPI"
        elif self.ranks == 1:
            text = f"MPIStrategy, 1 rank, {self.strategy}"
        else:
            text = f"with MPI, {self.ranks} ranks, {self.strategy}"
        return f"{text}, {describe(self.setting)}" if self.setting else text

    def order(self) -> tuple[Any, ...]:
        return (self.ranks, self.strategy != "single", self.strategy, repr(self.setting))


@dataclass
class Report:
    """The runs of a directory, placed: ``cells[(row, model)]`` lists the runs (seeds) of one cell."""

    runs: list[Run]
    keys: list[str]
    models: list[str]
    rows: list[Row]
    cells: dict[tuple[Row, str], list[Run]]
    warnings: list[str]

    def row_of(self, run: Run) -> Row:
        return Row(int(run["ranks"]), str(run["strategy"]), setting(run, self.keys))


def place(runs: list[Run], warnings: Sequence[str] = ()) -> Report:
    """Group ``runs`` into rows and model columns (see the module documentation)."""
    keys = varying_keys(runs, lambda r: (r["model"], r["ranks"], r["strategy"]))
    report = Report(runs, keys, [], [], defaultdict(list), list(warnings))
    for run in runs:
        report.cells[(report.row_of(run), run["model"])].append(run)
    found = {model for _, model in report.cells}
    report.models = [m for m in MODELS if m in found] + sorted(found - set(MODELS))
    report.rows = sorted({row for row, _ in report.cells}, key=Row.order)
    report.warnings += repeated_seeds(runs, lambda r: (report.row_of(r), r["model"]))
    return report


def load(paths: Sequence[str | Path]) -> Report:
    """The forecasting runs under ``paths``, placed; the warnings name what was left out."""
    runs, warnings = load_runs(paths, accept)
    if not runs:
        raise FileNotFoundError(f"No forecasting result.json under {', '.join(map(str, paths))}.")
    return place(runs, warnings)


def _rmse(run: Run) -> float:
    return run["metrics"]["rmse"]


def _fit(run: Run) -> float:
    return run["fit_seconds"]


def _baseline(name: str) -> Callable[[Run], float]:
    return lambda run: run["baselines"][name]["rmse"]


def table(report: Report) -> str:
    """The markdown table and its notes: a missing cell shows as a dash; a cell of several seeds as median [min-max]."""
    models = report.models

    def line(label: str, cells: Sequence[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def shared_seeds(row: Row) -> str | None:
        """The row's seeds if its cells ran the same several seeds (the label then says so, not every cell)."""
        found = [report.cells[(row, m)] for m in models if (row, m) in report.cells]
        texts = {seeds_text(runs) for runs in found}
        return texts.pop() if len(texts) == 1 and any(len(runs) > 1 for runs in found) else None

    def cells(row: Row, read: Callable[[Run], float], fmt: str, labelled: bool) -> list[str]:
        out = []
        for m in models:
            found = report.cells.get((row, m))
            if not found:
                out.append("-")
                continue
            text = spread(found, read).format(fmt)
            out.append(text if labelled or len(found) == 1 else f"{text} (seeds {seeds_text(found)})")
        return out

    lines = ["| | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for quantity, read, fmt in (("RMSE", _rmse, "{:,.0f}"), ("fit time (s)", _fit, "{:,.1f}")):
        for row in report.rows:
            seeds = shared_seeds(row)
            label = f"{quantity}, {row.label}" + (f" (seeds {seeds})" if seeds else "")
            lines.append(line(label, cells(row, read, fmt, seeds is not None)))
    for name, label in (
        ("persistence", "persistence RMSE (tomorrow = today)"),
        ("seasonal7", "7-day seasonal naive RMSE"),
    ):
        for data, per_model in _baselines(report, name).items():
            suffix = f", {describe(data)}" if data else ""
            lines.append(line(label + suffix, [per_model[m].format() if m in per_model else "-" for m in models]))
    notes = [
        (
            "Cells: one run, or the median [min-max] over the runs that differ only in their seed. "
            "Fit time: `Trainer.fit` on the slowest rank."
        )
    ]
    between = _between_columns(report)
    if between:
        notes.append("Settings that differ between the columns: " + "; ".join(between) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _baselines(report: Report, name: str) -> dict[tuple[tuple[str, Hashable], ...], dict[str, Spread]]:
    """The baseline per data setting (the row settings of ``data.*`` keys) and model: they depend on the data only."""
    found: dict[tuple[tuple[str, Hashable], ...], dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for (row, model), runs in report.cells.items():
        data = tuple((k, v) for k, v in row.setting if k.startswith("data."))
        found[data][model] += runs
    return {
        data: {model: spread(runs, _baseline(name)) for model, runs in per_model.items()}
        for data, per_model in sorted(found.items(), key=lambda item: repr(item[0]))
    }


def _between_columns(report: Report) -> list[str]:
    """Non-model keys that take different values in different model columns of the same row (the study's batch of
    100 for GRU, 128 for the others): ``data.batch_size (LSTM 128, GRU 100)``."""
    keys = varying_keys(report.runs, report.row_of)
    out = []
    for key in keys:
        if key.startswith("model.") or key in report.keys:
            continue
        values = {
            m: sorted(
                {str(r.config.get(key, "-")) for (row, mm), runs in report.cells.items() if mm == m for r in runs}
            )
            for m in report.models
        }
        out.append(f"{key} (" + ", ".join(f"{m} {'/'.join(v)}" for m, v in values.items()) + ")")
    return out


def bar_positions(report: Report) -> tuple[dict[tuple[Row, str], float], float]:
    """The x position of every cell's bar and the bars' width: model ``j``'s bars side by side in row order,
    centred on ``j`` whichever configurations that model ran in (no gap for a configuration it lacks)."""
    present = {model: [row for row in report.rows if (row, model) in report.cells] for model in report.models}
    width = 0.8 / max(len(rows) for rows in present.values())
    positions = {
        (row, model): j + (k - (len(rows) - 1) / 2) * width
        for j, (model, rows) in enumerate(present.items())
        for k, row in enumerate(rows)
    }
    return positions, width


def bar_chart(report: Report, path: Path) -> None:
    """Fit time and test RMSE per model: one bar per configuration (colour and hatch, named in the legend below),
    centred on the model's tick; a range bar over the seeds where a cell has several; persistence as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    models, rows = report.models, report.rows
    colours = plt.get_cmap("tab10").colors
    hatches = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    positions, width = bar_positions(report)
    for ax, read, title in ((axes[0], _fit, "training time: Trainer.fit (s)"), (axes[1], _rmse, "test RMSE (cases)")):
        for i, row in enumerate(rows):
            xs, heights, low, high = [], [], [], []
            for model in models:
                if (row, model) not in positions:
                    continue  # no bar where there was no run (a zero-height bar would read as a result)
                xs.append(positions[(row, model)])
                s = spread(report.cells[(row, model)], read)
                heights.append(s.median)
                low.append(s.median - s.low)
                high.append(s.high - s.median)
            ax.bar(
                xs,
                heights,
                width=width * 0.95,
                color=colours[i % len(colours)],
                hatch=hatches[i % len(hatches)],
                edgecolor="white",
                linewidth=0.5,
                label=row.label,
                yerr=[low, high] if any(low + high) else None,
                capsize=3,
                error_kw={"elinewidth": 1},
            )
        ax.set_xticks(range(len(models)), models)
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_title(title)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 10 else f"{value:g}"))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    persistence = _baselines(report, "persistence")
    values = {round(s.median, 6) for per_model in persistence.values() for s in per_model.values()}
    if len(values) == 1:
        value = values.pop()
        axes[1].axhline(
            value,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"persistence baseline (tomorrow = today): RMSE {value:,.0f}",
        )
    else:  # several data settings: each model's baseline(s) as short segments over its group of bars
        for j, model in enumerate(models):
            for per_model in persistence.values():
                if model in per_model:
                    axes[1].hlines(
                        per_model[model].median,
                        j - 0.45,
                        j + 0.45,
                        color="black",
                        linestyles="--",
                        linewidth=1,
                        label="persistence baseline of each model's data" if j == 0 else None,
                    )
    handles, labels = axes[1].get_legend_handles_labels()
    bars = [i for i, label in enumerate(labels) if not label.startswith("persistence")]  # configurations first
    order = bars + [i for i in range(len(labels)) if i not in bars]
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    several = any(len(runs) > 1 for runs in report.cells.values())
    fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), frameon=False, fontsize=9)
    caption = "bars: one run, or the median over seeds with a [min-max] range bar" if several else "bars: one run each"
    fig.suptitle(f"Forecasting runs by configuration ({caption})", fontsize=11)
    legend_rows = (len(labels) + 1) // 2
    fig.tight_layout(rect=(0, 0.05 * legend_rows + 0.01, 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a run or multirun directory (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="where to write table.md and table.png")
    args = parser.parse_args(argv)
    report = load([args.root])
    warn(report.warnings)
    out = args.out or args.root
    text = table(report)
    write_atomically(out / "table.md", lambda tmp: tmp.write_text(text))
    bar_chart(report, out / "table.png")
    print(text)
    print(
        f"{len(report.runs)} run(s) in {len(report.rows)} configuration(s); wrote {out / 'table.md'} and "
        f"{out / 'table.png'}"
    )
    return text


if __name__ == "__main__":
    main()
