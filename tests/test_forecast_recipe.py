"""The forecasting recipe in one process: config composition, a run, bad input (2 ranks: tests/mpi/test_recipes.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import recipes.forecasting.train as train
from lightning_mpi import MPIStrategy
from lightning_mpi.hydra import _check_argv, check_sweep_plugins
from tests.mpirun import ROOT, check
from tests.shared_data import shared_data

TENNESSEE = "tennessee-covid19-nyt.csv"  # in ../shared/data


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "forecasting" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_composes_to_the_improved_forecaster() -> None:
    cfg = config()
    assert cfg.data.transform == "logratio"
    assert cfg.data.source == "sir"
    assert cfg.model._target_.endswith("LSTMForecaster")
    assert cfg.data.batch_size == 128
    assert instantiate(cfg.strategy).__class__.__name__ == "SingleDeviceStrategy"


@pytest.mark.parametrize(("model", "batch"), [("lstm", 128), ("bilstm", 128), ("gru", 100)])
def test_study_experiment_has_the_studys_exact_setting(model: str, batch: int) -> None:
    cfg = config("experiment=covid_table", f"model={model}")
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.model.hidden_size) == (1500, batch, 50)
    assert (cfg.data.transform, cfg.data.scaler, cfg.data.train_fraction, cfg.data.days) == (
        "level",
        "minmax",
        0.8,
        766,
    )
    assert cfg.data.source == "nyt"
    assert cfg.data.state == "Tennessee"


def test_strategies_instantiate_as_documented() -> None:
    average = instantiate(config("strategy=average").strategy)
    assert isinstance(average, MPIStrategy)
    assert average.policy.name == "average"
    assert average.policy.every_n_steps is None
    assert average.policy.every_n_epochs is None
    assert instantiate(config("strategy=allreduce").strategy).policy.name == "allreduce"
    assert instantiate(config("strategy=ensemble").strategy).policy.voting == "mean"  # forecasts are averaged


def test_a_config_key_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ConfigCompositionException, match="hiden_size"):
        config("model.hiden_size=10")
    with pytest.raises(ConfigCompositionException, match="every_n_step"):
        config("strategy=average", "strategy.every_n_step=8")  # the MPIStrategy schema: a misspelt argument


@pytest.mark.parametrize("model", ["lstm", "bilstm", "gru"])
def test_a_model_argument_of_the_wrong_type_fails_at_composition(model: str) -> None:
    with pytest.raises(ConfigCompositionException, match="model.hidden_size=fifty") as error:
        config(f"model={model}", "model.hidden_size=fifty")
    assert "'fifty' of type 'str' could not be converted to Integer" in str(error.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="model.dropout"):
        config(f"model={model}", "model.dropout=lots")
    assert config(f"model={model}", "model.hidden_size=64").model.hidden_size == 64


def test_a_classification_option_fails_at_composition_naming_the_choices() -> None:
    with pytest.raises(MissingConfigException, match="Available options in 'model':\n\tbilstm\n\tgru\n\tlstm"):
        config("model=cnn")
    with pytest.raises(MissingConfigException, match="Available options in 'data':\n\tsir\n\ttennessee"):
        config("data=mnist")
    with pytest.raises(ConfigCompositionException, match="max_epochs"):
        config("trainer.max_epochs=abc")


def test_one_process_run_writes_result_and_plot(tmp_path: Path) -> None:
    cfg = config("trainer.max_epochs=2", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}", "data.days=200")
    result = train.run(cfg)
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["metrics"] == result["metrics"]
    assert written["ranks"] == 1
    assert written["strategy"] == "single"
    assert written["model"] == "LSTM"
    assert written["epochs"] == 2
    # the predictions' errors (float64) and the torchmetrics of the test loop (float32) agree, both in case counts
    assert written["metrics"]["rmse"] == pytest.approx(written["logged"]["rmse"], rel=1e-4)
    assert "forecast_metrics" not in written
    assert set(written["baselines"]) == {"persistence", "seasonal7"}
    assert written["baselines"]["persistence"]["rmse"] > 0
    assert (tmp_path / "forecast.png").stat().st_size > 10_000
    assert written["config"]["data"]["days"] == 200


def test_bad_input_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr("lightning.pytorch.Trainer.fit", no_training)
    tennessee = shared_data(TENNESSEE)
    cases = {
        "data.path=/nonexistent/file.csv": (FileNotFoundError, "does not exist"),
        "data.state=Atlantis": (ValueError, "State 'Atlantis' is not in"),
        "data.window=800": (ValueError, "too short"),
    }
    for override, (error, message) in cases.items():
        cfg = config("data=tennessee", f"data.path={tennessee}", override, f"output_dir={tmp_path}")
        with pytest.raises(error, match=message):
            train.run(cfg)
    assert not (tmp_path / "result.json").exists()


def test_non_basic_sweepers_and_launchers_are_refused_under_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="only the basic hydra/sweeper"):
        _check_argv(["-m", "hydra/sweeper=optuna"])
    _check_argv(["-m", "hydra/launcher=basic", "model=lstm,gru"])
    hydra_cfg = OmegaConf.create({"sweeper": {"_target_": "hydra_plugins.x.OptunaSweeper"}, "launcher": None})
    check_sweep_plugins(hydra_cfg)  # fine outside MPI
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="OptunaSweeper is not supported under mpirun"):
        check_sweep_plugins(hydra_cfg)


def test_a_run_ends_with_one_line_of_results_and_where_they_are(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launched = subprocess.run(
        [sys.executable, "-m", "recipes.forecasting", "trainer.max_epochs=1", "data.days=200", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    check(launched)
    last = launched.stdout.strip().splitlines()[-1]
    assert "LSTM, single, 1 process: test RMSE " in last
    assert "(persistence " in last
    assert "fit " in last
    assert last.endswith(f"; results in {out}")
    assert (out / "train.log").read_text().strip().splitlines()[-1] == last  # the job's log too
    assert (out / "result.json").is_file()
    assert (out / "forecast.png").is_file()
