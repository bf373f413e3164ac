"""The recipes under mpirun, each launched on 2 ranks as a user runs it (``mpirun -n 2 python -m recipes.<name>``):
one directory per job written once, rank 0's console, the same statistics as one process, errors printed once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import recipes.classification.report as classify_report
import recipes.forecasting.report as report
import recipes.time_to_accuracy.run as tta
from recipes.forecasting.data import ForecastDataModule
from tests.mpirun import check, run_mpi
from tests.shared_data import shared_data

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks

TENNESSEE = "tennessee-covid19-nyt.csv"  # in ../shared/data
PARAMETERS = 93_322  # the study CNN's


def test_two_rank_ensemble_run_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launched = check(
        run_mpi(
            2,
            ["-m", "recipes.classification", "experiment=ensemble_table", "data=digits", "trainer.max_epochs=1",
             f"hydra.run.dir={out}"],
            timeout=180,
        )
    )  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["ranks"] == 2
    assert result["sync"] == "ensemble"
    assert len(result["members"]) == 2
    assert sum(map(sum, result["confusion_matrix"])) == result["test_samples"] == 360
    # the test loop's MPI-synced torchmetrics agree with the scores of the gathered predictions
    assert result["logged"]["test/acc"] == pytest.approx(result["metrics"]["acc"], abs=1e-6)
    assert result["logged"]["test/member_1/acc"] == pytest.approx(result["members"][1]["acc"], abs=1e-6)
    assert (out / "confusion_matrix.png").stat().st_size > 0
    # one result line on the console (rank 0's), the job's log ends with it; rank 1 logs to its own file
    summary = f"ensemble_table on digits, 2 ranks, ensemble: test accuracy {100 * result['metrics']['acc']:.2f} %"
    assert launched.stdout.count(summary) == 1
    assert summary in launched.stdout.strip().splitlines()[-1]
    assert summary in (out / "classify.log").read_text().strip().splitlines()[-1]
    rank1 = (out / "classify.rank1.log").read_text()
    assert summary in rank1
    assert "Seed set to 0" in rank1
    assert (launched.stdout + launched.stderr).count("Seed set to 0") == 1  # rank 0's only

    sequential = dict(result, ranks=1, train_time_s=2 * result["train_time_s"], members=result["members"][:1])
    markdown = classify_report.report([sequential, result], tmp_path / "report")
    assert "| 2 | 0 |" in markdown
    assert "50.00 %" in markdown
    assert (tmp_path / "report" / "ensemble_table-digits-scaling.png").is_file()


def test_one_process_strategy_is_refused_under_several_ranks(tmp_path: Path) -> None:
    launched = run_mpi(
        2,
        ["-m", "recipes.classification", "strategy=single", "data=digits", f"hydra.run.dir={tmp_path}"],
        timeout=120,
    )
    assert launched.returncode != 0
    assert "strategy=SingleDeviceStrategy runs one process, but this job has 2 MPI ranks" in launched.stderr
    assert not (tmp_path / "result.json").exists()
    # raised alike on both ranks: Hydra's report comes once (rank 0's), rank 1 says so in one line
    assert launched.stderr.count("Error executing job with overrides") == 1, launched.stderr
    assert "rank 1/2: ValueError: strategy=SingleDeviceStrategy" in launched.stderr
    assert "(the same exception as rank 0, which printed its traceback)" in launched.stderr


def test_two_rank_multirun_shares_job_directories_and_statistics(tmp_path: Path) -> None:

    sweep, tennessee = tmp_path / "sweep", shared_data(TENNESSEE)
    launched = run_mpi(
        2,
        ["-m", "recipes.forecasting", "-m", "experiment=covid_table", "model=lstm,gru", "strategy=allreduce,average",
         "seed=0,1", "trainer.max_epochs=2", f"data.path={tennessee}", f"hydra.sweep.dir={sweep}"],
        timeout=300,
    )  # fmt: skip
    check(launched)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 8, jobs  # one directory per job, shared by both ranks
    assert len(list(sweep.rglob(".hydra"))) == 8
    assert len(list(sweep.rglob("result.json"))) == 8
    reference = ForecastDataModule(source="nyt", path=str(tennessee), transform="level", scaler="minmax")
    reference.prepare()
    for job in jobs:
        assert (job / "train.log").exists()
        assert (job / "train.rank1.log").exists()
        assert "RMSE" in (job / "train.rank1.log").read_text()
        result = json.loads((job / "result.json").read_text())
        assert result["ranks"] == 2
        assert result["strategy"] in ("allreduce", "average")
        # statistics combined over 2 ranks equal those of one process, exactly
        assert (result["scaler"]["offset"], result["scaler"]["scale"]) == (
            reference.transform.offset,
            reference.transform.scale,
        )
        assert round(result["baselines"]["persistence"]["rmse"]) == 8262
        summary = (job / "train.log").read_text().strip().splitlines()[-1]
        assert summary.endswith(f"results in {job}")
        assert "2 ranks: test RMSE" in summary
    # the console is rank 0's: one summary line per job, no second copy of Hydra's sweep lines
    assert launched.stdout.count("test RMSE") == 8
    assert launched.stdout.count("Launching 8 jobs locally") == 1
    assert launched.stdout.count("#7 : ") == 1
    text = report.main([str(sweep)])
    for strategy in ("allreduce", "average"):  # both strategies, both seeds: nothing dropped or overwritten
        assert f"| RMSE, with MPI, 2 ranks, {strategy} (seeds 0, 1) |" in text
    assert "LSTM | GRU" in text
    assert "| persistence RMSE (tomorrow = today) | 8,262 | 8,262 |" in text
    assert (sweep / "table.png").exists()


def test_two_ranks_over_shared_memory(tmp_path: Path) -> None:
    """The recipe end to end at tiny scale: every variant kind, the same start, the bytes each one sends."""
    shared_data("mnist-t10k")  # the recipe's data (recipes/time_to_accuracy/conf: data.root)
    overrides = [
        "network=shm", f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}", "steps=16", "eval_every=8",
        "data.train_size=2000", "data.val_size=500", "only=[allreduce,average_8,diloco_8,diloco_32_bf16]",
        "variants.diloco_32_bf16.every_n_steps=8",
    ]  # fmt: skip
    launched = check(run_mpi(2, ["-m", "recipes.time_to_accuracy", *overrides], timeout=120))
    results = json.loads((tmp_path / tta.RESULTS).read_text())
    shm = results["networks"]["shm"]
    assert (shm["ranks"], shm["nodes"], shm["val_samples"]) == (2, 1, 500)  # really 2 ranks
    variants = shm["variants"]
    assert list(variants) == ["allreduce", "average_8", "diloco_8", "diloco_32_bf16"]
    for run in variants.values():
        points = run["points"]
        assert [p["step"] for p in points] == [0, 8, 16]
        assert points[0]["bytes"] == 0
        assert points[0]["time_s"] < points[1]["time_s"] < points[2]["time_s"]
        assert all(0.0 <= p["acc"] <= 1.0 for p in points)
    assert len({run["points"][0]["acc"] for run in variants.values()}) == 1  # the same initial weights
    sent = {name: run["points"][-1]["bytes"] for name, run in variants.items()}
    model = 4 * PARAMETERS
    assert 16 * model <= sent["allreduce"] < 16.2 * model  # gradients every step (plus per-parameter flags)
    assert 2 * model <= sent["average_8"] < 2.01 * model
    assert 2 * model <= sent["diloco_8"] < 2.01 * model
    assert model <= sent["diloco_32_bf16"] < 1.01 * model  # half precision on the wire, gathered: counted too
    analysis = shm["analysis"]
    assert analysis["target"] == pytest.approx(variants["allreduce"]["points"][-1]["acc"] - 0.01)
    assert "verdict" not in shm  # the criterion is about the emulated network
    assert (tmp_path / tta.TABLE).read_text().count("| diloco_8 |") == 1
    assert (tmp_path / tta.PLOT).stat().st_size > 10_000
    output = launched.stdout + launched.stderr
    assert output.count("time to accuracy: shm: target") == 1  # one line, rank 0's
