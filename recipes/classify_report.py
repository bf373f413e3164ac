"""Tables and plots from the ``result.json`` files written by ``recipes/classify.py``.

    python recipes/classify_report.py /tmp/classify --out /tmp/classify/report

Runs are grouped by (experiment, data) and compared over their number of ranks; the 1-rank run of a group
is the sequential baseline. Prints the markdown and writes ``report.md`` and the plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_mpi.files import save_figure

Result = dict[str, Any]


def load_results(paths: Iterable[str | Path]) -> list[Result]:
    """Every ``result.json`` given directly or found under the given directories."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.rglob("result.json")) if path.is_dir() else [path]
    return [json.loads(f.read_text()) for f in files]


def group(results: Iterable[Result]) -> dict[tuple[str, str, str], list[Result]]:
    """Results keyed by (mode, experiment, data), each list sorted by ranks (the latest run per rank count wins)."""
    groups: dict[tuple[str, str, str], dict[int, Result]] = defaultdict(dict)
    for r in results:
        groups[(r["mode"], r["experiment"], r["data"])][r["ranks"]] = r
    return {key: [runs[n] for n in sorted(runs)] for key, runs in sorted(groups.items())}


def _baseline(runs: Sequence[Result], key: str) -> float | None:
    return next((r[key] for r in runs if r["ranks"] == 1), None)


def _mean_cpu(run: Result) -> float:
    """CPU seconds of training per rank: the work, unaffected by other jobs sharing the cores."""
    cpu = run["train_cpu_per_rank_s"]
    return sum(cpu) / len(cpu)


def ensemble_table(runs: Sequence[Result]) -> str:
    """Accuracy of the ensemble and of its members, and training time reduced against the 1-rank model."""
    base = _baseline(runs, "train_time_s")
    lines = [
        (
            "| Ranks | Ensemble acc. | Members acc. (min-max) | Precision | Recall | F1 | Training time (s) "
            "| Time reduction | CPU s / rank |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        m, accs = r["metrics"], [member["acc"] for member in r["members"]]
        reduction = f"{100 * (1 - r['train_time_s'] / base):.2f} %" if base else "-"
        lines.append(
            f"| {r['ranks']} | {100 * m['acc']:.2f} % | {100 * min(accs):.2f}-{100 * max(accs):.2f} % | "
            f"{m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {r['train_time_s']:.1f} | {reduction} | "
            f"{_mean_cpu(r):.1f} |"
        )
    return "\n".join(lines)


def speedup_table(runs: Sequence[Result]) -> str:
    """Speed-up ``T1 / Tn`` and efficiency ``speed-up / n`` of the training time, with the accuracy reached."""
    base = _baseline(runs, "train_time_s")
    lines = [
        "| Ranks | Training time (s) | Speed-up | Efficiency | CPU s / rank | Accuracy | F1 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        speedup = base / r["train_time_s"] if base else float("nan")
        lines.append(
            f"| {r['ranks']} | {r['train_time_s']:.1f} | {speedup:.2f} | {speedup / r['ranks']:.2f} | {_mean_cpu(r):.1f} | "
            f"{100 * r['metrics']['acc']:.2f} % | {r['metrics']['f1']:.4f} |"
        )
    return "\n".join(lines)


def kfold_table(runs: Sequence[Result]) -> str:
    """Fold scores (mean and spread) and test scores of the fold ensemble and of the averaged weights."""
    lines = [
        (
            "| Ranks | Folds | Held-out acc. (mean ± sd) | Fold ensemble test acc. | Averaged weights test acc. "
            "| k-fold time (s) | Sum of fold times (s) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['ranks']} | {r['folds']} | {100 * r['fold_acc_mean']:.2f} ± {100 * r['fold_acc_std']:.2f} % | "
            f"{100 * r['metrics']['acc']:.2f} % | {100 * r['averaged_weights']['acc']:.2f} % | "
            f"{r['kfold_time_s']:.1f} | {r['train_time_sum_s']:.1f} |"
        )
    return "\n".join(lines)


def table(mode: str, experiment: str, runs: Sequence[Result]) -> str:
    """The table that fits the runs: k-fold, ensemble (several members) or data-parallel speed-up."""
    if mode == "kfold":
        return kfold_table(runs)
    if any(r["sync"] == "ensemble" for r in runs):
        return ensemble_table(runs)
    return speedup_table(runs)


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
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_scaling(runs: Sequence[Result], path: Path, title: str) -> None:
    """Speed-up and efficiency of the training time against the number of ranks, with the ideal line."""
    plt = _pyplot()
    base = _baseline(runs, "train_time_s")
    ranks = [r["ranks"] for r in runs]
    speedup = [base / r["train_time_s"] for r in runs] if base else [float("nan")] * len(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(ranks, speedup, "o-", label="measured")
    left.plot(ranks, ranks, "--", color="grey", label="ideal")
    left.set(xlabel="ranks", ylabel="speed-up", title="speed-up", xticks=ranks)
    left.legend()
    right.plot(ranks, [s / n for s, n in zip(speedup, ranks)], "o-")
    right.axhline(1.0, ls="--", color="grey")
    right.set(xlabel="ranks", ylabel="efficiency", title="efficiency", xticks=ranks, ylim=(0, 1.1))
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_accuracy(runs: Sequence[Result], path: Path, title: str) -> None:
    """Accuracy of the combined model and the range of its members against the number of ranks."""
    plt = _pyplot()
    ranks = [r["ranks"] for r in runs]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot(ranks, [100 * r["metrics"]["acc"] for r in runs], "o-", label="ensemble / model")
    low = [100 * min(m["acc"] for m in r["members"]) for r in runs]
    high = [100 * max(m["acc"] for m in r["members"]) for r in runs]
    ax.fill_between(ranks, low, high, alpha=0.25, label="members (min-max)")
    ax.set(xlabel="ranks", ylabel="test accuracy (%)", title=title, xticks=ranks)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report(results: Iterable[Result], out: Path) -> str:
    """The markdown of every group of runs; plots and ``report.md`` are written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for (mode, experiment, data), runs in group(results).items():
        stem = f"{experiment}-{data}"
        sections.append(f"### {experiment} on {data}\n\n{table(mode, experiment, runs)}\n")
        if len(runs) > 1:
            plot_scaling(runs, out / f"{stem}-scaling.png", f"{experiment} on {data}")
            plot_accuracy(runs, out / f"{stem}-accuracy.png", f"{experiment} on {data}")
        last = runs[-1]
        plot_confusion_matrix(
            last["confusion_matrix"], out / f"{stem}-confusion.png", f"{experiment} on {data}, {last['ranks']} rank(s)"
        )
    markdown = "\n".join(sections)
    (out / "report.md").write_text(markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="result.json files or directories holding them")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and the plots")
    args = parser.parse_args(argv)
    print(report(load_results(args.paths), args.out))


if __name__ == "__main__":
    main()
