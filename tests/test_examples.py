"""examples/ in one process as a user runs them (2 ranks: tests/mpi/test_examples.py), and README as a front page:
its links lead somewhere, and it stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.mpirun import ROOT, check

EXAMPLES = ROOT / "examples"
EPOCH_LINE = re.compile(r"^epoch (\d+)/8 \| step \d+ \| [\d.]+ s \| .*val_loss [\d.e-]+", re.M)


def test_readme_is_a_front_page_whose_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):  # relative links: files and folders of this repository
        assert (ROOT / target).exists(), target
    for section in ("## Install", "## Quick start", "## Launching", "## Three ways to combine ranks"):
        assert section in readme


def test_train_example_runs_in_one_process_without_loading_mpi(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text((EXAMPLES / "train.py").read_text() + "\nimport sys; assert 'mpi4py.MPI' not in sys.modules\n")
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False
    )
    check(run)
    assert "1 rank(s): val_loss " in run.stdout  # trainer.print: stdout; rank_zero_info: Lightning's log, stderr
    assert "bytes each rank sent in the last epoch: 0" in run.stderr
