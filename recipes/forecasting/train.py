"""Forecast daily case counts with LSTM / BiLSTM / GRU, without MPI or over MPI ranks.

    python -m recipes.forecasting experiment=covid_table model=gru                       # one row cell, 1 process
    mpirun -n 2 python -m recipes.forecasting experiment=covid_table strategy=average    # with MPI
    mpirun -n 2 python -m recipes.forecasting -m experiment=covid_table model=lstm,bilstm,gru strategy=average

Rank 0 writes ``result.json`` and ``forecast.png`` into the job's directory and ends with one line (console and
the job's log): the test RMSE against the baselines, the fit time and where the files are. ``result.json`` holds:

- ``metrics``: test RMSE and MAE in cases, computed in float64 from the forecast gathered over the whole test
  period (the numbers the reports use);
- ``logged``: what the test loop logged (``test/rmse``, ``test/mae``: torchmetrics synchronised over the ranks, in
  float32), kept as a cross-check: it agrees with ``metrics`` to about 1e-6 relative;
- ``baselines`` (persistence and 7-day seasonal naive on the same targets), ``fit_seconds`` and ``total_seconds``
  (slowest rank), ``ranks``, ``strategy``, the scaler's statistics and the full ``config``.

The logic is :func:`run`, importable without Hydra's command line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_mpi.files import save_figure, write_json
from lightning_mpi.hydra import check_strategy_fits_job, job_output_dir, mpi_hydra_main
from recipes.configs import register as register_configs
from recipes.configs import trainer_options
from recipes.runs import shown

register_configs()  # the schemas and shared settings conf/ refers to


def run(cfg: DictConfig) -> dict[str, Any]:
    """Prepare the data, train, test and compare with the baselines; return the result on every rank.

    Bad input (files, states, window sizes, config keys) fails in the preparation, before any training.
    Rank 0 also writes the result (and the plot, if ``cfg.plot``) to ``cfg.output_dir`` or Hydra's job directory.
    """
    from hydra.utils import instantiate
    from lightning.pytorch import Trainer, seed_everything

    from lightning_mpi.comm import world

    start = time.perf_counter()
    comm = world()
    strategy = instantiate(cfg.strategy)
    check_strategy_fits_job(strategy, comm.size)
    if cfg.threads is not None and comm.size == 1:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed, verbose=False)

    data = instantiate(cfg.data)
    data.prepare(comm)
    # Partial: a dataclass passed through instantiate would come back as a DictConfig.
    model = instantiate(cfg.model, _partial_=True)(window=data.window, horizon=data.horizon, transform=data.transform)
    options = trainer_options(cfg.trainer)
    options["enable_progress_bar"] = bool(options.get("enable_progress_bar", True)) and comm.rank == 0
    trainer = Trainer(
        **options, strategy=strategy, logger=False, enable_checkpointing=False, enable_model_summary=False
    )

    fit_start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = _slowest(comm, time.perf_counter() - fit_start)
    logged = trainer.test(model, datamodule=data, verbose=False)[0]
    forecast = torch.cat(trainer.predict(model, datamodule=data)).numpy()

    result = _result(cfg, comm.size, data, model, logged, forecast, fit_seconds)
    result["total_seconds"] = _slowest(comm, time.perf_counter() - start)
    if comm.rank == 0:
        out = job_output_dir(cfg)
        write_json(out / "result.json", result)
        if cfg.plot:
            plot_forecast(out / "forecast.png", data, forecast, result)
    return result


def _slowest(comm: Any, seconds: float) -> float:
    """The largest of every rank's ``seconds``: a job's time is its slowest rank's."""
    value = torch.tensor([seconds], dtype=torch.float64)
    return float(comm.allreduce_(value, "max").item())


def _result(
    cfg: DictConfig,
    ranks: int,
    data: Any,
    model: Any,
    logged: dict[str, float],
    forecast: np.ndarray,
    fit_seconds: float,
) -> dict[str, Any]:
    from recipes.forecasting.data import errors

    _, target = data.test_windows()
    strategy = OmegaConf.select(cfg, "strategy.sync") or "single"
    return {
        "name": cfg.name,
        "model": type(model).__name__.removesuffix("Forecaster"),
        "strategy": strategy,
        "ranks": ranks,
        "epochs": int(cfg.trainer.max_epochs),
        "batch_size": int(data.batch_size),
        "train_windows": int(data.split),
        "test_windows": len(target),
        "metrics": errors(forecast, target),
        "logged": {"rmse": float(logged["test/rmse"]), "mae": float(logged["test/mae"])},
        "baselines": data.baselines(),
        "scaler": {
            "transform": data.transform.kind,
            "kind": data.scaler_kind,
            "offset": data.transform.offset,
            "scale": data.transform.scale,
        },
        "fit_seconds": fit_seconds,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }


def plot_forecast(path: Path, data: Any, forecast: np.ndarray, result: dict[str, Any]) -> None:
    """Actual vs forecast (first forecast day) over the test period, with the persistence baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    from recipes.forecasting.data import first_date

    x, y = data.test_windows()
    days: Any = np.arange(data.split, data.split + len(y)) + data.window
    if data.source == "nyt":  # dated data: the calendar on the x axis, and the state in the title
        days = first_date(data.path, data.state) + days
        label, axis = f"{data.state} COVID-19 cases (New York Times data)", "date"
    else:
        label, axis = f"{data.source.upper()} epidemic (generated, seed {data.seed})", "day of the series"
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(days, y[:, 0], label="actual", color="black")
    ax.plot(days, forecast[:, 0], label=f"{result['model']} (RMSE {result['metrics']['rmse']:,.0f})")
    persistence = result["baselines"]["persistence"]["rmse"]
    ax.plot(days, x[:, -1], label=f"persistence (RMSE {persistence:,.0f})", linestyle="--", alpha=0.7)
    ax.set_xlabel(axis)
    ax.set_ylabel("active cases")
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ranks = "1 process" if result["ranks"] == 1 else f"{result['ranks']} ranks"
    how = "without MPI" if result["strategy"] == "single" else f"{ranks}, {result['strategy']}"
    ax.set_title(f"{label}: {result['model']} ({how}), next-day forecast over the test period", fontsize=10)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any], out: Path) -> str:
    """The run in one line: model, strategy and ranks, test RMSE against the baselines, fit time, where files are."""
    base = result["baselines"]
    ranks = "1 process" if result["ranks"] == 1 else f"{result['ranks']} ranks"
    return (
        f"{result['model']}, {result['strategy']}, {ranks}: test RMSE {result['metrics']['rmse']:,.0f} "
        f"(persistence {base['persistence']['rmse']:,.0f}, 7-day seasonal naive {base['seasonal7']['rmse']:,.0f}), "
        f"fit {result['fit_seconds']:.1f} s; results in {shown(out)}"
    )


@mpi_hydra_main(config_path=str(Path(__file__).with_name("conf")), config_name="config")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    # Hydra's job logging: rank 0's console and the job's log; ranks > 0 their own <job>.rank<r>.log
    logging.getLogger(__name__).info(summary(result, job_output_dir(cfg)))
