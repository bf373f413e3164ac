"""Tables and plots from the ``result.json`` files written by ``recipes/classification/train.py``.

    python -m recipes.classification.report /tmp/classify [--out /tmp/classify/report]

Runs are grouped by (mode, experiment, data) into sections and compared over their number of ranks; the 1-rank
run of a section is the sequential baseline. Every configuration keeps its own row (any setting that differs
between the runs, such as epochs, is shown); runs that differ only in their seed share a row: the median
[min-max] over the seeds. Files that cannot be placed are named in warnings. Prints the markdown, writes
``report.md`` and the plots into ``--out`` (default: ``report/`` inside the first directory given) and says where.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_mpi.files import save_figure, write_atomically
from recipes.runs import (
    Run,
    describe,
    flatten,
    load_runs,
    repeated_seeds,
    seeds_text,
    setting,
    spread,
    varying_keys,
    warn,
)

Result = dict[str, Any]
Section = tuple[str, str, str]  # (mode, experiment, data)


def accept(result: Result) -> str | None:
    """``None`` for a classification result, else why it is not one."""
    if "mode" not in result:
        return "not a result of recipes/classification/train.py (forecasting results: recipes/forecasting/report.py)"
    needed = ("experiment", "data", "ranks", "metrics") + (("train_time_s",) if result["mode"] == "train" else ())
    missing = [key for key in needed if key not in result]
    return f"incomplete classification result (no {', '.join(missing)})" if missing else None


@dataclass
class Row:
    """The runs of one configuration (several seeds, or one run) within a section."""

    ranks: int
    setting: tuple[tuple[str, Hashable], ...]
    runs: list[Run]

    @property
    def seeds(self) -> str:
        return seeds_text(self.runs)


def _as_run(item: Result | Run) -> Run:
    if isinstance(item, Run):
        return item
    return Run(Path("<memory>"), item, flatten(item.get("config") or {}))


def _section(run: Run) -> Section:
    return (run["mode"], run["experiment"], run["data"])


def group(results: Iterable[Result | Run]) -> tuple[dict[Section, list[Row]], list[str]]:
    """Rows per section, sorted by ranks then setting; and warnings for configurations run twice with one seed."""
    runs = [_as_run(r) for r in results]
    keys = varying_keys(runs, lambda r: (_section(r), r["ranks"], r.result.get("sync")))
    sections: dict[Section, dict[tuple[Any, ...], Row]] = defaultdict(dict)
    for run in runs:
        values = setting(run, keys)
        row = sections[_section(run)].setdefault((run["ranks"], values), Row(run["ranks"], values, []))
        row.runs.append(run)
    warnings = repeated_seeds(runs, lambda r: (_section(r), r["ranks"], setting(r, keys)))
    ordered = {
        key: sorted(rows.values(), key=lambda row: (row.ranks, repr(row.setting)))
        for key, rows in sorted(sections.items())
    }
    return ordered, warnings


def _median(runs: Iterable[Run], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _baseline_runs(rows: Sequence[Row], row: Row) -> list[Run] | None:
    """The runs of the 1-rank row with the same setting (or of any 1-rank row): the sequential model."""
    ones = [r for r in rows if r.ranks == 1]
    same = [r for r in ones if r.setting == row.setting] or ones
    return same[0].runs if same else None


def _baseline(rows: Sequence[Row], row: Row) -> float | None:
    """The sequential model's median training time."""
    runs = _baseline_runs(rows, row)
    return _median(runs, "train_time_s") if runs else None


def _mean_cpu(run: Run) -> float:
    """CPU seconds of training per rank: the work, unaffected by other jobs sharing the cores."""
    cpu = run["train_cpu_per_rank_s"]
    return sum(cpu) / len(cpu)


def _cpu_speedup(rows: Sequence[Row], row: Row) -> float:
    """The sequential model's CPU seconds over this row's per rank (medians): the speed-up the ranks would show
    with a core each and nothing else running, which wall times on a busy machine cannot."""
    runs = _baseline_runs(rows, row)
    if not runs:
        return float("nan")
    return statistics.median(map(_mean_cpu, runs)) / statistics.median(map(_mean_cpu, row.runs))


def distortion(machine: dict[str, Any] | None) -> str | None:
    """Why a run's wall time does not measure the job alone, given the run's ``machine`` record (``None``: not
    judged): its node had fewer cores than its ranks, or other work kept more cores busy than the job's ranks could
    (the 1-minute load average at the end of the run exceeded the cores by more than half a core).

    >>> distortion({"cores": 2, "ranks_on_node": 2, "load_1min": 4.1})
    'load 4.1 on 2 cores'
    >>> distortion({"cores": 2, "ranks_on_node": 4, "load_1min": 4.0})
    '4 ranks on 2 cores'
    >>> distortion({"cores": 2, "ranks_on_node": 2, "load_1min": 2.2}) is None
    True
    """
    if machine is None:
        return None
    if machine["ranks_on_node"] > machine["cores"]:
        return f"{machine['ranks_on_node']} ranks on {machine['cores']} cores"
    if machine["load_1min"] > machine["cores"] + 0.5:
        return f"load {machine['load_1min']:.1f} on {machine['cores']} cores"
    return None


def _load(runs: Sequence[Run]) -> str:
    loads = [r.result["machine"] for r in runs if "machine" in r.result]
    if not loads:
        return "-"
    return f"{statistics.median(m['load_1min'] for m in loads):.1f} / {loads[0]['cores']}"


def load_warning(rows: Sequence[Row]) -> str:
    """A warning naming the rows whose wall times other work (or too few cores) stretched, or ``""``."""
    judged = [(row.ranks, distortion(r.result.get("machine"))) for row in rows for r in row.runs]
    distorted = sorted({(ranks, why) for ranks, why in judged if why})
    if not distorted:
        return ""
    which = "; ".join(f"{ranks} rank(s): {why}" for ranks, why in distorted)
    return (
        f"\n\n**Wall times distorted** ({which}): other work shared the cores, so the training times, time "
        "reductions and speed-ups above measure the machine's load, not the job. Read the CPU columns (the work "
        "per rank), or rerun on an idle machine."
    )


def _percent(runs: Sequence[Run], read: Any) -> str:
    return spread(runs, read).format("{:.2f}", scale=100, unit=" %")


def _head(rows: Sequence[Row], columns: Sequence[str]) -> list[str]:
    """Header lines; a Setting column where rows differ in more than their ranks."""
    setting = ["Setting"] if any(r.setting for r in rows) else []
    names = ["Ranks", *setting, "Seeds", *columns]
    return ["| " + " | ".join(names) + " |", "|" + "---:|" * len(names)]


def _lead(rows: Sequence[Row], row: Row) -> str:
    setting = [describe(row.setting) or "-"] if any(r.setting for r in rows) else []
    return "| " + " | ".join([str(row.ranks), *setting, row.seeds]) + " | "


def ensemble_table(rows: Sequence[Row]) -> str:
    """Accuracy of the ensemble (median [min-max] over seeds) and of its members (lowest-highest member of any
    seed), macro scores (medians), and the training time reduced against the 1-rank model (medians)."""
    lines = _head(
        rows,
        [
            "Ensemble acc.",
            "Members acc. (min-max)",
            "Precision",
            "Recall",
            "F1",
            "Training time (s)",
            "Time reduction",
            "CPU s / rank",
            "CPU time reduction",
            "Load / cores",
        ],
    )
    for row in rows:
        runs, base = row.runs, _baseline(rows, row)
        members = [m["acc"] for r in runs for m in r["members"]]
        time = _median(runs, "train_time_s")
        reduction = f"{100 * (1 - time / base):.2f} %" if base else "-"
        lines.append(
            _lead(rows, row)
            + f"{_percent(runs, lambda r: r['metrics']['acc'])} | "
            + f"{100 * min(members):.2f}-{100 * max(members):.2f} % | "
            + " | ".join(
                f"{statistics.median(r['metrics'][k] for r in runs):.4f}" for k in ("precision", "recall", "f1")
            )
            + f" | {spread(runs, lambda r: r['train_time_s']).format('{:.1f}')} | {reduction} | "
            + f"{statistics.median(map(_mean_cpu, runs)):.1f} | {100 * (1 - 1 / _cpu_speedup(rows, row)):.2f} % | "
            + f"{_load(runs)} |"
        )
    return "\n".join(lines)


def speedup_table(rows: Sequence[Row]) -> str:
    """Speed-up ``T1 / Tn`` and efficiency ``speed-up / n`` of the median training times, beside the speed-up of
    the CPU seconds per rank, with the accuracy and the machine's load."""
    lines = _head(
        rows,
        ["Training time (s)", "Speed-up", "Efficiency", "CPU s / rank", "CPU speed-up", "Load / cores", "Accuracy",
         "F1"],
    )  # fmt: skip
    for row in rows:
        runs, base = row.runs, _baseline(rows, row)
        speedup = base / _median(runs, "train_time_s") if base else float("nan")
        lines.append(
            _lead(rows, row)
            + f"{spread(runs, lambda r: r['train_time_s']).format('{:.1f}')} | {speedup:.2f} | "
            + f"{speedup / row.ranks:.2f} | {statistics.median(map(_mean_cpu, runs)):.1f} | "
            + f"{_cpu_speedup(rows, row):.2f} | {_load(runs)} | "
            + f"{_percent(runs, lambda r: r['metrics']['acc'])} | "
            + f"{statistics.median(r['metrics']['f1'] for r in runs):.4f} |"
        )
    return "\n".join(lines)


def kfold_table(rows: Sequence[Row]) -> str:
    """Fold scores (mean ± sd over folds; over seeds: their medians) and the test scores of the fold ensemble and
    of the averaged weights."""
    lines = _head(
        rows,
        [
            "Held-out acc. (mean ± sd)",
            "Fold ensemble test acc.",
            "Averaged weights test acc.",
            "k-fold time (s)",
            "Sum of fold times (s)",
            "Folds",
        ],
    )
    for row in rows:
        runs = row.runs
        held_out = f"{100 * _median(runs, 'fold_acc_mean'):.2f} ± {100 * _median(runs, 'fold_acc_std'):.2f} %"
        lines.append(
            _lead(rows, row)
            + f"{held_out} | {_percent(runs, lambda r: r['metrics']['acc'])} | "
            + f"{_percent(runs, lambda r: r['averaged_weights']['acc'])} | {_median(runs, 'kfold_time_s'):.1f} | "
            + f"{_median(runs, 'train_time_sum_s'):.1f} | {'/'.join(sorted({str(r['folds']) for r in runs}))} |"
        )
    return "\n".join(lines)


def table(mode: str, rows: Sequence[Row]) -> str:
    """The table that fits the runs: k-fold, ensemble (several members) or data-parallel speed-up."""
    if mode == "kfold":
        return kfold_table(rows)
    if any(r.result.get("sync") == "ensemble" for row in rows for r in row.runs):
        return ensemble_table(rows)
    return speedup_table(rows)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], path: Path, title: str) -> None:
    """A confusion matrix (rows: true class, columns: predicted class) with its counts, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    image = ax.imshow(matrix, cmap="Blues")
    n = len(matrix)
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            colour = "white" if matrix[i][j] > peak / 2 else "black"
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _series(rows: Sequence[Row]) -> dict[tuple[tuple[str, Hashable], ...], list[Row]]:
    """Rows by setting: one line per setting, over the ranks."""
    series: dict[tuple[tuple[str, Hashable], ...], list[Row]] = defaultdict(list)
    for row in rows:
        series[row.setting].append(row)
    return series


def plot_scaling(rows: Sequence[Row], path: Path, title: str) -> None:
    """Speed-up and efficiency of the median training time against the number of ranks, with the ideal line and
    the speed-up of the CPU seconds per rank; the title says when load distorted the wall times."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    ranks_all = sorted({row.ranks for row in rows})
    for values, line in _series(rows).items():
        base = _baseline(rows, line[0])
        ranks = [row.ranks for row in line]
        speedup = [base / _median(row.runs, "train_time_s") if base else float("nan") for row in line]
        label = describe(values) or "measured"
        (wall,) = left.plot(ranks, speedup, "o-", label=f"{label}, wall time")
        left.plot(
            ranks, [_cpu_speedup(rows, row) for row in line], "s:", color=wall.get_color(), label=f"{label}, CPU time"
        )
        right.plot(ranks, [s / n for s, n in zip(speedup, ranks)], "o-", label=label)
    left.plot(ranks_all, ranks_all, "--", color="grey", label="ideal")
    left.set(
        xlabel="ranks",
        ylabel="speed-up over 1 rank (medians)",
        title="speed-up",
        xticks=ranks_all,
        ylim=(0, max(ranks_all) + 0.5),
    )
    left.legend(fontsize=8)
    right.axhline(1.0, ls="--", color="grey")
    right.set(xlabel="ranks", ylabel="efficiency", title="efficiency", xticks=ranks_all, ylim=(0, 1.1))
    fig.suptitle(title + (" - wall times distorted by load" if load_warning(rows) else ""))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def accuracy_limits(values: Sequence[float]) -> tuple[float, float]:
    """Y limits (percent) that show every value on an axis at least 10 points tall ending at 100 %: differences of a
    point or two look like what they are.

    >>> accuracy_limits([97.3, 98.25])
    (90.0, 100.5)
    >>> accuracy_limits([45.0, 95.0])
    (40.0, 100.5)
    """
    floor = 5 * int((min(values) - 1) // 5)  # a multiple of 5 at least a point below the lowest value
    return float(min(floor, 90)), 100.5


def plot_accuracy(rows: Sequence[Row], path: Path, title: str) -> None:
    """Test accuracy against the number of ranks: the ensemble (median over seeds, with the [min-max] range as an
    error bar) and every member of every seed as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    shown: list[float] = []
    series = _series(rows)
    for k, (values, line) in enumerate(series.items()):
        shift = (k - (len(series) - 1) / 2) * 0.08
        ranks = [row.ranks + shift for row in line]
        accs = [spread(row.runs, lambda r: 100 * r["metrics"]["acc"]) for row in line]
        medians = [s.median for s in accs]
        name = "ensemble / model" + (f" ({describe(values)})" if values else "")
        several = any(len(row.runs) > 1 for row in line)
        ax.errorbar(
            ranks,
            medians,
            yerr=[[s.median - s.low for s in accs], [s.high - s.median for s in accs]],
            fmt="o-",
            capsize=4,
            label=name + (": median, bar min-max over seeds" if several else ""),
        )
        for x, s in zip(ranks, accs):
            ax.annotate(f"{s.median:.2f}", (x, s.median), textcoords="offset points", xytext=(8, 6), fontsize=8)
        members = [(row.ranks + shift, 100 * m["acc"]) for row in line for r in row.runs for m in r["members"]]
        ax.scatter(
            [x + 0.12 for x, _ in members],
            [y for _, y in members],
            s=12,
            color="grey",
            alpha=0.6,
            label="members (one dot per member and seed)" if k == 0 else None,
        )
        shown += [s.low for s in accs] + [y for _, y in members]
    ranks_all = sorted({row.ranks for row in rows})
    ax.set(
        xlabel="ranks",
        ylabel="test accuracy (%)",
        xticks=ranks_all,
        ylim=accuracy_limits(shown),
        xlim=(min(ranks_all) - 0.5, max(ranks_all) + 0.5),
    )
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report(results: Iterable[Result | Run], out: Path) -> str:
    """The markdown of every section; plots and ``report.md`` are written into ``out``."""
    sections, warnings = group(results)
    warn(warnings)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for (mode, experiment, data), rows in sections.items():
        stem = f"{experiment}-{data}"
        seeds = sorted({seeds_text(row.runs) for row in rows})
        note = (
            "\n\nRows with several seeds: median [min-max] over the seeds (ensemble and model accuracy, training "
            "time); precision, recall, F1, CPU s and the time reduction from the medians."
            if any(len(row.runs) > 1 for row in rows)
            else ""
        )
        loaded = load_warning(rows)
        if loaded:
            warn([f"{experiment} on {data}: {loaded.strip()}"])
        parts.append(f"### {experiment} on {data}\n\n{table(mode, rows)}{note}{loaded}\n")
        if len({row.ranks for row in rows}) > 1 and mode == "train":
            plot_scaling(rows, out / f"{stem}-scaling.png", f"{experiment} on {data}")
        if mode == "train":
            plot_accuracy(rows, out / f"{stem}-accuracy.png", f"{experiment} on {data}, seeds {', '.join(seeds)}")
        last = rows[-1]
        matrix = [
            [sum(r["confusion_matrix"][i][j] for r in last.runs) for j in range(len(row))]
            for i, row in enumerate(last.runs[0]["confusion_matrix"])
        ]
        summed = f", summed over seeds {last.seeds}" if len(last.runs) > 1 else ""
        plot_confusion_matrix(
            matrix, out / f"{stem}-confusion.png", f"{experiment} on {data}, {last.ranks} rank(s){summed}"
        )
    markdown = "\n".join(parts)
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(markdown))
    return markdown


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="result.json files or directories holding them")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for report.md and the plots (default: report/ in the first directory given)",
    )
    args = parser.parse_args(argv)
    runs, warnings = load_runs(args.paths, accept)
    warn(warnings)
    if not runs:
        raise SystemExit(f"error: no classification result.json under {', '.join(map(str, args.paths))}")
    first = args.paths[0]
    out = args.out or (first if first.is_dir() else first.parent) / "report"
    markdown = report(runs, out)
    print(markdown)
    print(f"{len(runs)} run(s); wrote {out / 'report.md'} and the plots in {out}")
    return markdown


if __name__ == "__main__":
    main()
