"""A failing, stalled or killed rank ends the whole job promptly, with a message naming the rank."""

from __future__ import annotations

import pytest

from tests.mpirun import run_mpi

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks

# Start-up (imports, MPI_Init) takes ~5-10 s here: anything close to the timeout would be a hang.
PROMPT = 60


def launch(mode: str):
    return run_mpi(2, ["-m", "tests.scenarios.failing", mode], timeout=PROMPT)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("training_step", "RuntimeError: deliberate failure in training_step"),
        ("validation", "ValueError: deliberate failure in validation_step"),
        ("callback", "KeyError: 'deliberate failure in a callback'"),
    ],
)
def test_exception_on_one_rank_ends_every_rank(mode, message):
    result = launch(mode)
    assert result.returncode != 0
    assert "[lightning-mpi] rank 1/2 failed" in result.stderr
    assert message in result.stderr
    assert "finished without failing" not in result.stdout


def test_stalled_collective_is_reported_and_aborted():
    result = launch("stall")
    assert result.returncode != 0
    report = result.stderr
    assert "collective barrier did not complete within 3 s (epoch 0, step 2)" in report
    assert "ranks that did not arrive: [1]" in report
    assert "rank 1: not in a collective" in report  # rank 1 answered: it is busy outside MPI


def test_ranks_in_different_collectives_are_named_in_the_stall_report():
    result = launch("mismatch")
    assert result.returncode != 0
    report = result.stderr
    assert "did not complete within 3 s (epoch 0, step 2)" in report
    assert "wait in a different collective" in report
    assert "rank 0: waiting" in report
    assert "barrier" in report
    assert "rank 1: waiting" in report
    assert "allgather" in report


def test_the_timeout_of_the_strategy_in_use_applies():
    # A first Trainer without stall detection created the job's communicator; the second one's timeout=3 applies.
    result = launch("late_timeout")
    assert result.returncode != 0
    assert "collective barrier did not complete within 3 s" in result.stderr


def test_killed_rank_ends_the_job():
    result = launch("kill")
    assert result.returncode != 0
    assert "finished without failing" not in result.stdout


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("shapes", "The model (parameter and buffer names, shapes, dtypes) differs between rank 0 and rank 1"),
        ("optimizer", "The optimizer configuration differs between rank 0 and rank 1"),
        ("devices", "Trainer(devices=3) asks for 3 ranks per node, but the MPI launcher started 2"),
    ],
)
def test_mismatch_is_a_clear_error_not_a_hang(mode, message):
    result = launch(mode)
    assert result.returncode != 0
    assert message in result.stderr
    assert "finished without failing" not in result.stdout


def test_nonfinite_gradients_on_one_rank_skip_the_step_everywhere():
    result = launch("nan_skip")
    assert result.returncode == 0, result.stderr
    # both ranks skipped the same steps (batch 2 of each epoch) and finished with finite parameters
    assert result.stdout.count("finished without failing; skipped [2, 34]; finite True") == 2


def test_nonfinite_gradients_on_one_rank_raise_everywhere():
    result = launch("nan_raise")
    assert result.returncode != 0
    assert "FloatingPointError: Non-finite gradients at global step 2" in result.stderr
