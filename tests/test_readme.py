"""README's own-script example is complete: it runs as it stands, in one process and on two ranks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpirun import ROOT, check, run_mpi


def readme_script(tmp_path: Path) -> Path:
    """The Python block of README's "Use it in your own script", as ``train.py``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- include-start: own-script -->")[1].split("<!-- include-end: own-script -->")[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    script = tmp_path / "train.py"
    script.write_text(code)
    return script


def test_the_readme_script_runs_in_one_process_without_loading_mpi(tmp_path: Path) -> None:
    script = readme_script(tmp_path)
    script.write_text(script.read_text() + "\nimport sys; assert 'mpi4py.MPI' not in sys.modules\n")
    run = check(subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=180, check=False))  # fmt: skip
    assert "1 rank(s): val_loss " in run.stdout  # trainer.print: stdout; rank_zero_info: Lightning's log, stderr
    assert "bytes each rank sent in the last epoch: 0" in run.stderr


@pytest.mark.mpi
def test_the_readme_script_prints_once_on_two_ranks(tmp_path: Path) -> None:
    run = check(run_mpi(2, [str(readme_script(tmp_path))], timeout=180, cwd=tmp_path))
    assert run.stdout.count("2 rank(s): val_loss ") == 1
    assert run.stderr.count("bytes each rank sent in the last epoch: ") == 1
    assert "bytes each rank sent in the last epoch: 0" not in run.stderr  # gradients travelled
    assert (run.stdout + run.stderr).count("Seed set to 0") == 1  # Lightning's messages: rank 0's only
