"""Files that readers see whole or not at all: results and plots (checkpoints: see lightning_mpi.checkpoint)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary file next to ``path``, then rename it to ``path``: a reader (or a crash)
    finds the old file or the complete new one, never part of one. Returns ``path``.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = write_atomically(target, lambda tmp: tmp.write_text("whole"))
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('whole', ['a.txt'])
    >>> oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())  # readable as a plain file would be
    True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))  # mkstemp's 0600 would hide the file from the user's group
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _mode_for(path: Path) -> int:
    """The mode of the file being replaced, else what the umask gives a new file (as ``open`` would)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """``payload`` as indented JSON (other objects as their ``str``), atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))


def save_figure(figure: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """A matplotlib figure, in the format of ``path``'s suffix, atomically."""
    suffix = Path(path).suffix.lstrip(".") or "png"
    return write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=suffix))


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
