"""Files written once, whole, and readable by the user's group: results, plots and checkpoints."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_mpi import checkpoint
from lightning_mpi.files import write_json


def test_results_get_the_mode_the_umask_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_json(tmp_path / "result.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644  # mkstemp's 0600 before
        os.chmod(path, 0o640)
        write_json(path, {"a": 2})  # a replaced file keeps the mode it had
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


def test_checkpoint_mode_follows_the_umask(tmp_path):
    from fsspec.implementations.local import get_umask

    previous = os.umask(0o027)
    get_umask.cache_clear()  # fsspec reads the umask once per process (its first atomic save); this test changes it
    try:
        checkpoint.save(TorchCheckpointIO(), {"w": torch.zeros(3)}, tmp_path / "a.ckpt")
        assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
        get_umask.cache_clear()


def test_killed_save_leaves_a_named_partial_file_that_the_next_save_removes(tmp_path):
    # A process killed while writing (no unwinding: os._exit, as an abort or SIGKILL) leaves its temporary file.
    script = textwrap.dedent(f"""
        import os, torch
        from fsspec.implementations.local import LocalFileOpener
        from lightning.fabric.plugins import TorchCheckpointIO
        from lightning_mpi import checkpoint
        def write_half_then_die(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os._exit(9)
        LocalFileOpener.write = write_half_then_die
        checkpoint.save(TorchCheckpointIO(), {{"w": torch.zeros(100000)}}, {str(tmp_path / "a.ckpt")!r})
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(checkpoint.PARTIAL_PREFIX), left
    checkpoint.save(TorchCheckpointIO(), {"w": torch.zeros(3)}, tmp_path / "b.ckpt")
    assert os.listdir(tmp_path) == ["b.ckpt"]


def test_interrupted_save_leaves_nothing(tmp_path):
    class Interrupt:
        def __reduce__(self):
            raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        checkpoint.save(TorchCheckpointIO(), {"w": torch.zeros(100000), "x": Interrupt()}, tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == []
