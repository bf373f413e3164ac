"""The classification recipe: config composition, a 2-rank ensemble run under mpirun, k-fold, the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import classify
import classify_report
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from hydra_configs import Mode
from omegaconf import DictConfig

from tests.mpirun import ROOT, check, run_mpi


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "classification"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_the_cnn_ensemble_on_the_embedded_digits() -> None:
    cfg = _compose()
    assert cfg.mode == Mode.train and cfg.data.name == "digits"
    assert cfg.strategy.sync == "ensemble" and cfg.strategy.voting == "hard"
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 93_322
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)


def test_the_study_experiments_read_mnist() -> None:
    for experiment in ("ensemble_table", "kfold"):
        cfg = _compose(f"experiment={experiment}")
        assert cfg.data.name == "mnist" and (cfg.data.train_size, cfg.data.test_size) == (8000, 2000)


def test_a_forecasting_option_or_a_wrong_type_fails_at_composition() -> None:
    with pytest.raises(MissingConfigException, match="Available options in 'model':\n\tcnn\n\tmlp"):
        _compose("model=lstm")
    with pytest.raises(MissingConfigException, match="Available options in 'data'"):
        _compose("data=tennessee")
    with pytest.raises(ConfigCompositionException, match="max_epochs"):
        _compose("trainer.max_epochs=abc")
    with pytest.raises(ConfigCompositionException, match="mode"):
        _compose("mode=folds")


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        ("ensemble_table", {"strategy.sync": "ensemble", "model._target_": "classification.models.CNNClassifier"}),
        ("mlp_speedup", {"strategy.sync": "allreduce", "data.name": "synthetic", "model.in_features": 64}),
        ("kfold", {"mode": Mode.kfold, "kfold.folds": 10, "model.optimizer.lr": 0.099,
                   "model.optimizer._target_": "torch.optim.SGD", "data.batch_size": 1024, "trainer.max_epochs": 20}),
        ("fashion_mlp", {"strategy.sync": "allreduce", "model.activation": "sigmoid", "model.optimizer.lr": 0.01,
                         "data.name": "fashion_mnist", "model.in_features": 784}),
    ],
)  # fmt: skip
def test_experiments_compose(experiment: str, expected: dict[str, Any]) -> None:
    cfg = _compose(f"experiment={experiment}")
    assert cfg.name == experiment
    for key, value in expected.items():
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_mlp_follows_the_data_set() -> None:
    cfg = _compose("model=mlp", "data=digits", "strategy=allreduce")
    model = instantiate(cfg.model)
    assert model.net[1].in_features == 784


def test_kfold_in_one_process(tmp_path: Path) -> None:
    cfg = _compose(
        "experiment=kfold", "data=digits", "kfold.folds=2", "trainer.max_epochs=1", "data.batch_size=64",
        "model.optimizer.lr=0.05", f"output_dir={tmp_path}",
    )  # fmt: skip
    result = classify.run(cfg)
    assert [f["fold"] for f in result["fold_scores"]] == [0, 1]
    held_out = [f["held_out"]["acc"] for f in result["fold_scores"]]
    assert len(result["members"]) == 2 and result["fold_acc_mean"] == pytest.approx(sum(held_out) / 2)
    assert sum(map(sum, result["confusion_matrix"])) == result["test_samples"]  # every test sample voted on once
    assert {"acc", "precision", "recall", "f1"} <= set(result["averaged_weights"])
    assert (tmp_path / "result.json").is_file() and (tmp_path / "confusion_matrix.png").is_file()


@pytest.mark.mpi
def test_two_rank_ensemble_run_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    check(
        run_mpi(
            2,
            ["recipes/classify.py", "experiment=ensemble_table", "data=digits", "trainer.max_epochs=1",
             f"hydra.run.dir={out}"],
            timeout=180,
        )
    )  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["ranks"] == 2 and result["sync"] == "ensemble" and len(result["members"]) == 2
    assert sum(map(sum, result["confusion_matrix"])) == result["test_samples"] == 360
    # the test loop's MPI-synced torchmetrics agree with the scores of the gathered predictions
    assert result["logged"]["test/acc"] == pytest.approx(result["metrics"]["acc"], abs=1e-6)
    assert result["logged"]["test/member_1/acc"] == pytest.approx(result["members"][1]["acc"], abs=1e-6)
    assert (out / "confusion_matrix.png").stat().st_size > 0

    sequential = dict(result, ranks=1, train_time_s=2 * result["train_time_s"], members=result["members"][:1])
    markdown = classify_report.report([sequential, result], tmp_path / "report")
    assert "| 2 |" in markdown and "50.00 %" in markdown  # half the sequential time
    assert (tmp_path / "report" / "ensemble_table-digits-scaling.png").is_file()


@pytest.mark.mpi
def test_one_process_strategy_is_refused_under_several_ranks(tmp_path: Path) -> None:
    launched = run_mpi(
        2, ["recipes/classify.py", "strategy=single", "data=digits", f"hydra.run.dir={tmp_path}"], timeout=120
    )
    assert launched.returncode != 0
    assert "strategy=SingleDeviceStrategy runs one process, but this job has 2 MPI ranks" in launched.stderr
    assert not (tmp_path / "result.json").exists()


def test_speedup_and_kfold_tables() -> None:
    runs = [
        {"ranks": n, "sync": "allreduce", "train_time_s": t, "train_cpu_per_rank_s": [t] * n,
         "metrics": {"acc": 0.9, "f1": 0.9}}
        for n, t in ((1, 10.0), (2, 5.5), (4, 3.0))
    ]
    table = classify_report.speedup_table(runs)
    assert "| 2 | 5.5 | 1.82 | 0.91 | 5.5 |" in table and "| 4 | 3.0 | 3.33 | 0.83 |" in table
    fold = {
        "ranks": 2, "folds": 10, "fold_acc_mean": 0.97, "fold_acc_std": 0.01, "metrics": {"acc": 0.98},
        "averaged_weights": {"acc": 0.975}, "kfold_time_s": 60.0, "train_time_sum_s": 115.0,
    }  # fmt: skip
    assert "| 2 | 10 | 97.00 ± 1.00 % | 98.00 % | 97.50 % | 60.0 | 115.0 |" in classify_report.kfold_table([fold])
