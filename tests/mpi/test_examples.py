"""examples/ on 2 ranks, as a user runs them (copied into an empty directory): one progress line per epoch from
rank 0 with stdout to a pipe, results printed once, files written once."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.mpirun import ROOT, check, run_mpi

pytestmark = pytest.mark.mpi  # every test here launches several MPI ranks

EXAMPLES = ROOT / "examples"
EPOCH_LINE = re.compile(r"^epoch (\d+)/8 \| step \d+ \| [\d.]+ s \| .*val_loss [\d.e-]+", re.M)


def test_train_example_prints_once_on_two_ranks_with_a_line_per_epoch(tmp_path: Path) -> None:
    run = check(run_mpi(2, [str(EXAMPLES / "train.py")], timeout=180, cwd=tmp_path))
    assert run.stdout.count("2 rank(s): val_loss ") == 1
    assert run.stderr.count("bytes each rank sent in the last epoch: ") == 1
    assert "bytes each rank sent in the last epoch: 0" not in run.stderr  # gradients travelled
    assert (run.stdout + run.stderr).count("Seed set to 0") == 1  # Lightning's messages: rank 0's only
    if shutil.which("srun"):  # Lightning's hint to prefix srun (without --mpi) is not given under an MPI launcher
        assert "The `srun` command is available" not in run.stderr
    # stdout is a pipe here, as a file under sbatch: one progress line per epoch, from rank 0 only
    lines = re.findall(r"^epoch (\d+)/10 \| step (\d+) \| [\d.]+ s \| train_loss [\d.e-]+ \| val_loss [\d.e-]+$",
                       run.stdout, re.M)  # fmt: skip
    assert [int(epoch) for epoch, _ in lines] == list(range(1, 11))
    assert [int(step) for _, step in lines] == [14 * e for e in range(1, 11)]  # 1,792 samples / (64 x 2 ranks)


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("allreduce", "allreduce, 2 rank(s): test_acc "),
        ("averaging", "average, 2 rank(s): test_acc "),
        ("diloco", "diloco, 2 rank(s): test_acc "),
        ("ensemble", "load_ensemble: 2 member(s)"),
    ],
)
def test_mode_examples_run_on_two_ranks(tmp_path: Path, example: str, expected: str) -> None:
    for name in (f"{example}.py", "blobs.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)  # as a user copies them
    run = check(run_mpi(2, [f"{example}.py"], timeout=240, cwd=tmp_path))
    assert run.stdout.count(expected) == 1, run.stdout
    epochs = [int(e) for e in EPOCH_LINE.findall(run.stdout)]
    assert epochs and epochs == list(range(1, len(epochs) + 1))  # EarlyStopping may end it before epoch 8
    accuracy = float(re.search(r"test_acc ([\d.]+)", run.stdout).group(1))
    assert accuracy > 0.5  # four classes: chance is 0.25
    logged = list(tmp_path.glob("example-logs/lightning_logs/version_0/metrics.csv"))
    assert len(logged) == 1  # CSVLogger: one version, written by rank 0
    checkpoints = sorted(p.name for p in tmp_path.glob("example-logs/lightning_logs/version_0/checkpoints/*.ckpt"))
    assert "last.ckpt" in checkpoints
    assert len(checkpoints) == 2  # the best and last: written once
