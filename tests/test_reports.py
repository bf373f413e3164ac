"""The report scripts keep every configuration apart, aggregate seeds, and name what they cannot place."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

import recipes.classification.report as classify_report
import recipes.forecasting.report as report
import recipes.runs as runs

FORECAST_CONFIG: dict[str, Any] = {
    "name": "forecast", "seed": 0, "threads": 1, "output_dir": None, "plot": True,
    "model": {"_target_": "forecasting.models.LSTMForecaster", "hidden_size": 50,
              "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001}},
    "data": {"batch_size": 128, "source": "sir", "days": 766, "window": 14},
    "strategy": {"_target_": "lightning.pytorch.strategies.SingleDeviceStrategy", "device": "cpu"},
    "trainer": {"accelerator": "cpu", "max_epochs": 300, "enable_progress_bar": True},
}  # fmt: skip
MPI_STRATEGY = {
    "_target_": "lightning_mpi.hydra.mpi_strategy",
    "sync": "allreduce",
    "every_n_steps": None,
    "timeout": 600.0,
}


def forecast_result(model: str, strategy: str, ranks: int, seed: int, rmse: float, fit: float = 5.0,
                    epochs: int = 300, persistence: float = 8261.73) -> dict[str, Any]:  # fmt: skip
    """A result.json as recipes/forecasting/train.py writes it (the fields the report reads, and the full config)."""
    config = copy.deepcopy(FORECAST_CONFIG)
    config["seed"] = seed
    config["model"]["_target_"] = f"forecasting.models.{model}Forecaster"
    if model == "GRU":
        config["data"]["batch_size"] = 100
    if strategy != "single":
        config["strategy"] = dict(MPI_STRATEGY, sync=strategy)
    config["trainer"]["max_epochs"] = epochs
    return {
        "name": "forecast", "model": model, "strategy": strategy, "ranks": ranks, "epochs": epochs,
        "metrics": {"rmse": rmse, "mae": rmse / 2}, "logged": {"rmse": rmse, "mae": rmse / 2},
        "baselines": {"persistence": {"rmse": persistence, "mae": 1.0}, "seasonal7": {"rmse": 29873.51, "mae": 1.0}},
        "fit_seconds": fit, "total_seconds": fit + 1, "config": config,
    }  # fmt: skip


def write_sweep(root: Path, results: list[dict[str, Any]]) -> None:
    for i, result in enumerate(results):
        (root / f"{i}_job").mkdir(parents=True)
        (root / f"{i}_job" / "result.json").write_text(json.dumps(result))


def test_two_strategies_and_two_seeds_all_appear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    rmse = {("LSTM", "allreduce"): (7000.0, 7400.0), ("LSTM", "average"): (7600.0, 8000.0),
            ("GRU", "allreduce"): (9000.0, 9100.0), ("GRU", "average"): (8100.0, 8300.0)}  # fmt: skip
    results = [
        forecast_result(model, strategy, 2, seed, rmse[(model, strategy)][seed], fit=4.0 + seed)
        for model in ("LSTM", "GRU") for strategy in ("allreduce", "average") for seed in (0, 1)
    ]  # fmt: skip
    results += [forecast_result("LSTM", "single", 1, 0, 7700.0, fit=10.0)]
    write_sweep(sweep, results)
    text = report.main([str(sweep)])
    out = capsys.readouterr()
    # every configuration has its rows; the two seeds of a cell are aggregated, not one of them kept
    assert "| RMSE, with MPI, 2 ranks, allreduce (seeds 0, 1) | 7,200 [7,000-7,400] | 9,050 [9,000-9,100] |" in text
    assert "| RMSE, with MPI, 2 ranks, average (seeds 0, 1) | 7,800 [7,600-8,000] | 8,200 [8,100-8,300] |" in text
    assert "| RMSE, without MPI | 7,700 | - |" in text
    assert "| fit time (s), with MPI, 2 ranks, average (seeds 0, 1) | 4.5 [4.0-5.0] | 4.5 [4.0-5.0] |" in text
    assert "| persistence RMSE (tomorrow = today) | 8,262 | 8,262 |" in text
    assert "data.batch_size (LSTM 128, GRU 100)" in text  # the study's GRU batch, said once
    assert f"wrote {sweep / 'table.md'} and {sweep / 'table.png'}" in out.out
    assert out.err == ""  # nothing left out
    assert (sweep / "table.md").read_text() == text
    assert (sweep / "table.png").stat().st_size > 10_000


def test_other_settings_get_rows_and_what_cannot_be_placed_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = [forecast_result("LSTM", "average", 2, 0, 7000.0, epochs=e) for e in (300, 1500)]
    results += [forecast_result("LSTM", "average", 2, 0, 7100.0, epochs=300)]  # the same run again
    results += [{"mode": "train", "experiment": "ensemble_table", "data": "digits", "ranks": 2, "metrics": {}}]
    write_sweep(tmp_path, results)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")
    text = report.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert "| RMSE, with MPI, 2 ranks, average, trainer.max_epochs=300 (seeds 0, 0) | 7,050 [7,000-7,100] |" in text
    assert "| RMSE, with MPI, 2 ranks, average, trainer.max_epochs=1500 | 7,000 |" in text
    assert "skipped" in err
    assert "a classification result (recipes/classification/report.py" in err
    assert "broken/result.json: not readable as JSON" in err
    assert "2 runs of the same configuration with seed 0 (all counted)" in err


def test_keys_that_say_where_files_are_do_not_split_rows() -> None:
    a, b = forecast_result("LSTM", "single", 1, 0, 1.0), forecast_result("LSTM", "single", 1, 1, 3.0)
    b["config"]["output_dir"] = "/elsewhere"
    b["config"]["data"]["path"] = "/data/copy.csv"
    placed = report.place([runs.Run(Path(str(i)), r, runs.flatten(r["config"])) for i, r in enumerate((a, b))])
    assert len(placed.rows) == 1
    assert placed.keys == []


def test_bars_are_centred_on_their_model_also_where_a_configuration_is_missing() -> None:
    results = [forecast_result("LSTM", s, n, 0, 7000.0) for s, n in (("single", 1), ("allreduce", 2), ("average", 2))]
    results += [forecast_result("GRU", s, 2, 0, 8000.0) for s in ("allreduce", "average")]  # no run without MPI
    placed = report.place([runs.Run(Path(str(i)), r, runs.flatten(r["config"])) for i, r in enumerate(results)])
    positions, width = report.bar_positions(placed)
    for j, model in enumerate(placed.models):
        xs = sorted(x for (_, m), x in positions.items() if m == model)
        assert sum(xs) / len(xs) == pytest.approx(j)  # centred on the model's tick
        assert all(b - a == pytest.approx(width) for a, b in itertools.pairwise(xs))  # side by side, no gap
    assert len(positions) == 5
    assert width == pytest.approx(0.8 / 3)


def classification_result(ranks: int, seed: int, acc: float, time: float, epochs: int = 10) -> dict[str, Any]:
    """A result.json as the classification recipe writes it for experiment=ensemble_table (the fields the report
    reads)."""
    member = {"acc": acc - 0.01, "precision": 0.9, "recall": 0.9, "f1": 0.9}
    return {
        "mode": "train", "experiment": "ensemble_table", "data": "mnist", "ranks": ranks, "sync": "ensemble",
        "train_time_s": time, "train_cpu_per_rank_s": [time] * ranks,
        "metrics": {"acc": acc, "precision": 0.98, "recall": 0.98, "f1": 0.98}, "members": [member] * ranks,
        "confusion_matrix": [[5, 1], [0, 4]],
        "config": {"name": "ensemble_table", "seed": seed, "trainer": {"max_epochs": epochs},
                   "data": {"name": "mnist", "source": {"root": f"/copy{seed}"}}},
    }  # fmt: skip


def test_classification_report_aggregates_seeds_per_rank_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = [classification_result(1, s, acc, 30.0 + s) for s, acc in enumerate((0.9795, 0.9810, 0.9800))]
    results += [classification_result(2, s, acc, 20.0 + s) for s, acc in enumerate((0.9825, 0.9750, 0.9790))]
    write_sweep(tmp_path / "runs", results)
    markdown = classify_report.main([str(tmp_path / "runs")])
    printed = capsys.readouterr().out
    assert "| 1 | 0-2 | 98.00 [97.95-98.10] % | 96.95-97.10 % |" in markdown
    assert "| 2 | 0-2 | 97.90 [97.50-98.25] % | 96.50-97.25 % |" in markdown
    assert "| 21.0 [20.0-22.0] | 32.26 % |" in markdown  # 1 - 21 / 31: from the medians
    out = tmp_path / "runs" / "report"  # by default inside the directory reported on, never the working directory
    assert f"wrote {out / 'report.md'}" in printed
    for name in ("report.md", "ensemble_table-mnist-accuracy.png", "ensemble_table-mnist-scaling.png"):
        assert (out / name).stat().st_size > 0


def test_classification_settings_other_than_the_seed_keep_their_rows(tmp_path: Path) -> None:
    results = [classification_result(1, 0, 0.98, 30.0), classification_result(1, 0, 0.97, 60.0, epochs=20)]
    sections, warnings = classify_report.group(results)
    (rows,) = sections.values()
    assert [classify_report.describe(r.setting) for r in rows] == ["trainer.max_epochs=10", "trainer.max_epochs=20"]
    assert warnings == []
    assert "| Ranks | Setting | Seeds |" in classify_report.ensemble_table(rows)


def test_accuracy_axis_is_at_least_ten_points_tall() -> None:
    assert classify_report.accuracy_limits([97.3, 98.25]) == (90.0, 100.5)
    assert classify_report.accuracy_limits([61.0]) == (60.0, 100.5)


def test_a_failed_job_of_a_sweep_is_named(tmp_path: Path, capsys) -> None:
    for job, has_result in (("0", True), ("1", False)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        if has_result:
            (tmp_path / job / "result.json").write_text(json.dumps(forecast_result("LSTM", "single", 1, 0, 100.0)))
    report.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert f"no result.json in job directory {tmp_path / '1'}" in err, err
