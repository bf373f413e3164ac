"""Turn forecasting runs (``result.json`` files under a directory) into the study's table and a bar chart.

    python recipes/report.py /tmp/forecast/covid_table [--out /tmp/forecast/covid_table]

Rows: RMSE and fit time without MPI (1 rank) and with MPI (more ranks), then the persistence and 7-day
seasonal naive baselines on the same test targets; columns: LSTM, BiLSTM, GRU. Writes ``table.md`` and
``table.png`` into ``--out`` (default: the directory) and prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_mpi.files import save_figure

MODELS = ("LSTM", "BiLSTM", "GRU")


def load_results(root: Path) -> list[dict[str, Any]]:
    """Every ``result.json`` below ``root``, oldest first (a later run of the same cell wins in the table)."""
    paths = sorted(root.rglob("result.json"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"No result.json under {root}: point the report at a run or multirun directory.")
    return [json.loads(p.read_text()) for p in paths]


def cells(results: Iterable[dict[str, Any]]) -> dict[tuple[str, bool], dict[str, Any]]:
    """The result per (model, with MPI)."""
    return {(r["model"], r["ranks"] > 1): r for r in results}


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table; a missing cell shows as a dash."""
    by_cell = cells(results)
    models = [m for m in MODELS if any(key[0] == m for key in by_cell)] or sorted({k[0] for k in by_cell})

    def row(label: str, value: Any) -> str:
        return f"| {label} | " + " | ".join(value(m) for m in models) + " |"

    def metric(mpi: bool, read: Any, fmt: str) -> Any:
        return lambda m: fmt.format(read(by_cell[(m, mpi)])) if (m, mpi) in by_cell else "-"

    def baseline(name: str) -> Any:
        def value(m: str) -> str:
            found = by_cell.get((m, False)) or by_cell.get((m, True))
            return f"{found['baselines'][name]['rmse']:,.2f}" if found else "-"

        return value

    ranks = sorted({r["ranks"] for r in results if r["ranks"] > 1})
    mpi_label = f"with MPI ({', '.join(map(str, ranks))} ranks)" if ranks else "with MPI"
    lines = [
        "| | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
        row("RMSE without MPI", metric(False, lambda r: r["metrics"]["rmse"], "{:,.2f}")),
        row(f"RMSE {mpi_label}", metric(True, lambda r: r["metrics"]["rmse"], "{:,.2f}")),
        row("time without MPI (s)", metric(False, lambda r: r["fit_seconds"], "{:,.2f}")),
        row(f"time {mpi_label} (s)", metric(True, lambda r: r["fit_seconds"], "{:,.2f}")),
        row("RMSE persistence (tomorrow = today)", baseline("persistence")),
        row("RMSE seasonal naive (7 days)", baseline("seasonal7")),
    ]
    return "\n".join(lines) + "\n"


def bar_chart(results: list[dict[str, Any]], path: Path) -> None:
    """Fit time and RMSE per model, without and with MPI, persistence as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_cell = cells(results)
    models = [m for m in MODELS if any(key[0] == m for key in by_cell)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, read, title in (
        (axes[0], lambda r: r["fit_seconds"], "training time (s)"),
        (axes[1], lambda r: r["metrics"]["rmse"], "test RMSE (cases)"),
    ):
        for offset, mpi, label in ((-0.2, False, "without MPI"), (0.2, True, "with MPI")):
            values = [read(by_cell[(m, mpi)]) if (m, mpi) in by_cell else 0.0 for m in models]
            ax.bar([i + offset for i in range(len(models))], values, width=0.4, label=label)
        ax.set_xticks(range(len(models)), models)
        ax.set_title(title)
    persistence = next(iter(by_cell.values()))["baselines"]["persistence"]["rmse"]
    axes[1].axhline(persistence, color="black", linestyle="--", label="persistence")
    axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a run or multirun directory (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="where to write table.md and table.png")
    args = parser.parse_args(argv)
    results = load_results(args.root)
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    (out / "table.md").write_text(text)
    bar_chart(results, out / "table.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
