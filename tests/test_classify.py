"""The classification recipe in one process: config composition, k-fold, the report (2 ranks:
tests/mpi/test_recipes.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig

import recipes.classification.report as classify_report
import recipes.classification.train as classify
from recipes.configs import Mode
from tests.mpirun import ROOT, check


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "recipes" / "classification" / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_the_cnn_ensemble_on_the_embedded_digits() -> None:
    cfg = _compose()
    assert cfg.mode == Mode.train
    assert cfg.data.name == "digits"
    assert cfg.strategy.sync == "ensemble"
    assert cfg.strategy.voting == "hard"
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 93_322
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)


def test_the_study_experiments_read_mnist() -> None:
    for experiment in ("ensemble_table", "kfold"):
        cfg = _compose(f"experiment={experiment}")
        assert cfg.data.name == "mnist"
        assert (cfg.data.train_size, cfg.data.test_size) == (8000, 2000)


def test_a_forecasting_option_or_a_wrong_type_fails_at_composition() -> None:
    with pytest.raises(MissingConfigException, match="Available options in 'model':\n\tcnn\n\tmlp"):
        _compose("model=lstm")
    with pytest.raises(MissingConfigException, match="Available options in 'data'"):
        _compose("data=tennessee")
    with pytest.raises(ConfigCompositionException, match="max_epochs"):
        _compose("trainer.max_epochs=abc")
    with pytest.raises(ConfigCompositionException, match="mode"):
        _compose("mode=folds")


def test_model_arguments_are_typed_as_the_model_classes_declare_them() -> None:
    import inspect

    from recipes.classification.models import MLPClassifier

    with pytest.raises(ConfigCompositionException, match="hidden_sizes"):
        _compose("model=mlp", "model.hidden_sizes=[3,x]")
    with pytest.raises(ConfigCompositionException, match="in_channels"):
        _compose("model=cnn", "model.in_channels=one")
    with pytest.raises(ConfigCompositionException, match="hiden_sizes"):
        _compose("model=mlp", "model.hiden_sizes=[3]")
    cfg = _compose("model=mlp", "model.hidden_sizes=[32,16]")
    assert list(cfg.model.hidden_sizes) == [32, 16]
    # the schema is the class's signature: every argument, no other key
    assert set(cfg.model) - {"_target_"} == set(inspect.signature(MLPClassifier).parameters)


def test_an_added_trainer_key_is_checked_before_the_trainer() -> None:
    # Hydra's own hint for a key the schema lacks is "+trainer.key=value", which bypasses the schema: the recipe
    # names the misspelt argument instead of failing inside Trainer.__init__
    from recipes.configs import trainer_options

    cfg = _compose("+trainer.max_epoch=5")
    with pytest.raises(ValueError, match=r"trainer.max_epoch is not an argument of Lightning's Trainer; did you mean "
                                         r"trainer.max_epochs\?"):  # fmt: skip
        trainer_options(cfg.trainer)
    assert trainer_options(_compose("+trainer.precision=64").trainer)["precision"] == 64


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        ("ensemble_table", {"strategy.sync": "ensemble",
                            "model._target_": "recipes.classification.models.CNNClassifier"}),
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
    assert len(result["members"]) == 2
    assert result["fold_acc_mean"] == pytest.approx(sum(held_out) / 2)
    assert sum(map(sum, result["confusion_matrix"])) == result["test_samples"]  # every test sample voted on once
    assert {"acc", "precision", "recall", "f1"} <= set(result["averaged_weights"])
    assert (tmp_path / "result.json").is_file()
    assert (tmp_path / "confusion_matrix.png").is_file()


def test_a_run_ends_with_one_line_of_results_and_where_they_are(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launched = subprocess.run(
        [sys.executable, "-m", "recipes.classification", "trainer.max_epochs=1", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    check(launched)
    last = launched.stdout.strip().splitlines()[-1]
    assert "classify on digits, 1 process, ensemble: test accuracy " in last
    assert "training " in last
    assert last.endswith(f"; results in {out}")
    assert (out / "classify.log").read_text().strip().splitlines()[-1] == last  # the job's log too


def test_kfold_summary_names_the_combined_scores_on_rank_0_only() -> None:
    result = {"mode": "kfold", "experiment": "kfold", "data": "mnist", "ranks": 2, "folds": 4, "kfold_time_s": 92.9}
    assert (
        classify.summary(result, Path("/r"))
        == "kfold on mnist, 2 ranks: k-fold 92.9 s (scores on rank 0); results in /r"
    )
    result.update(fold_acc_mean=0.9463, fold_acc_std=0.0101, metrics={"acc": 0.9555}, averaged_weights={"acc": 0.9545})
    assert classify.summary(result, Path("/r")) == (
        "kfold on mnist, 2 ranks, 4 folds: held-out accuracy 94.63 ± 1.01 %, fold ensemble 95.55 %, averaged weights "
        "95.45 %, k-fold 92.9 s; results in /r"
    )


def test_speedup_and_kfold_tables() -> None:
    results = [
        {"mode": "train", "experiment": "mlp_speedup", "data": "synthetic", "ranks": n, "sync": "allreduce",
         "train_time_s": t, "train_cpu_per_rank_s": [t] * n, "metrics": {"acc": 0.9, "f1": 0.9}, "config": {"seed": 0}}
        for n, t in ((1, 10.0), (2, 5.5), (4, 3.0))
    ]  # fmt: skip
    (rows,) = classify_report.group(results)[0].values()
    table = classify_report.speedup_table(rows)
    assert "| 2 | 0 | 5.5 | 1.82 | 0.91 | 5.5 | 1.82 | - |" in table
    assert "| 4 | 0 | 3.0 | 3.33 | 0.83 | 3.0 | 3.33 | - |" in table
    fold = {
        "mode": "kfold", "experiment": "kfold", "data": "mnist", "ranks": 2, "folds": 10, "fold_acc_mean": 0.97,
        "fold_acc_std": 0.01, "metrics": {"acc": 0.98}, "averaged_weights": {"acc": 0.975}, "kfold_time_s": 60.0,
        "train_time_sum_s": 115.0, "config": {"seed": 0},
    }  # fmt: skip
    (rows,) = classify_report.group([fold])[0].values()
    assert "| 2 | 0 | 97.00 ± 1.00 % | 98.00 % | 97.50 % | 60.0 | 115.0 | 10 |" in classify_report.kfold_table(rows)


def test_a_report_on_a_loaded_machine_warns_and_shows_cpu_speedups(tmp_path: Path, capsys) -> None:
    # the numbers a newcomer saw on a busy 2-core machine: wall times grow with the ranks, CPU seconds fall
    def run(ranks: int, wall: float, cpu: float, load: float) -> dict[str, Any]:
        return {"mode": "train", "experiment": "mlp_speedup", "data": "synthetic", "ranks": ranks, "sync": "allreduce",
                "train_time_s": wall, "train_cpu_per_rank_s": [cpu] * ranks, "metrics": {"acc": 0.9, "f1": 0.9},
                "members": [{"acc": 0.9}], "confusion_matrix": [[1, 0], [0, 1]], "config": {"seed": 0},
                "machine": {"cores": 2, "ranks_on_node": ranks, "load_1min": load, "host": "vm"}}  # fmt: skip

    loaded = [run(1, 10.0, 5.2, 4.3), run(2, 17.5, 4.0, 4.6), run(3, 25.0, 2.7, 5.0)]
    markdown = classify_report.report(loaded, tmp_path / "loaded")
    assert "| 2 | 0 | 17.5 | 0.57 | 0.29 | 4.0 | 1.30 | 4.6 / 2 |" in markdown
    assert "| 3 | 0 | 25.0 | 0.40 | 0.13 | 2.7 | 1.93 | 5.0 / 2 |" in markdown
    assert "**Wall times distorted** (1 rank(s): load 4.3 on 2 cores; 2 rank(s): load 4.6 on 2 cores; 3 rank(s): " \
           "3 ranks on 2 cores)" in markdown  # fmt: skip
    assert "warning: mlp_speedup on synthetic: **Wall times distorted**" in capsys.readouterr().err
    idle = [run(1, 10.0, 9.8, 1.0), run(2, 5.5, 4.9, 2.1)]
    assert "distorted" not in classify_report.report(idle, tmp_path / "idle")


def test_help_offers_the_strategies_not_the_schema() -> None:
    import subprocess
    import sys

    from tests.mpirun import ROOT

    run = subprocess.run([sys.executable, "-m", "recipes.classification", "--help"], capture_output=True,
                         text=True, timeout=120, check=True, cwd=ROOT)  # fmt: skip
    assert "strategy: allreduce, average, ensemble, single" in run.stdout
