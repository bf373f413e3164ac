"""Ranks > 0 keep Lightning's information and Python warnings off the shared console (lightning_mpi.console)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest

from lightning_mpi import console
from lightning_mpi._lightning import lightning_loggers


@pytest.fixture
def lightning_logging() -> Iterator[None]:
    """Lightning's loggers and Python's warning capture as they were, afterwards."""
    saved = [(logger, list(logger.handlers), logger.propagate) for logger in lightning_loggers()]
    filters = {id(h): list(h.filters) for logger, handlers, _ in saved for h in handlers}
    held = logging.getLogger("py.warnings")
    held_handlers = list(held.handlers)
    yield
    for logger, handlers, propagate in saved:
        logger.handlers[:] = handlers
        logger.propagate = propagate
        for handler in handlers:
            handler.filters[:] = filters[id(handler)]
    held.handlers[:] = held_handlers
    logging.captureWarnings(False)


def test_rank_0_is_left_alone(lightning_logging: None) -> None:
    before = [(list(logger.handlers), logger.propagate) for logger in lightning_loggers()]
    for change in (console.quiet_information, console.hold_warnings, console.into_rank_log):
        change(0)
    assert [(list(logger.handlers), logger.propagate) for logger in lightning_loggers()] == before
    assert all(not h.filters for logger in lightning_loggers() for h in logger.handlers)


def test_other_ranks_print_lightnings_warnings_not_its_information(lightning_logging: None) -> None:
    logger = logging.getLogger("lightning.fabric.utilities.seed")
    stream = logging.StreamHandler()
    logging.getLogger("lightning.fabric").addHandler(stream)
    console.quiet_information(1)
    console.quiet_information(1)  # idempotent
    assert stream.filters == [console._QUIET]
    info = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "Seed set to 0", (), None)
    warning = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "careful", (), None)
    assert not stream.filter(info)
    assert stream.filter(warning)


def test_other_ranks_of_a_hydra_job_log_into_their_file(lightning_logging: None) -> None:
    for logger in lightning_loggers():
        logger.addHandler(logging.StreamHandler())
        logger.addHandler(logging.FileHandler("/dev/null"))
        logger.propagate = False
    console.into_rank_log(2)
    for logger in lightning_loggers():
        assert logger.propagate
        assert all(type(h) is not logging.StreamHandler for h in logger.handlers)
        assert any(isinstance(h, logging.FileHandler) for h in logger.handlers)  # only consoles are removed
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        records: list[logging.LogRecord] = []
        catcher = logging.Handler()
        catcher.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("py.warnings").addHandler(catcher)
        warnings.warn("from rank 2", UserWarning, stacklevel=1)
    assert [r.getMessage() for r in records if "from rank 2" in r.getMessage()]  # a log record, not a print


def test_under_a_launcher_printed_lines_keep_their_order_with_logged_ones() -> None:
    # stdout and stderr into one pipe, as a launcher forwarding a rank's output: Python buffers a piped stdout in
    # blocks, so without line buffering "printed" came after "logged"
    import os
    import subprocess
    import sys

    code = "import sys, lightning_mpi; print('printed'); print('logged', file=sys.stderr); print('printed again')"
    env = {**os.environ, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}
    env.pop("PYTHONUNBUFFERED", None)
    result = subprocess.run(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-3:] == ["printed", "logged", "printed again"]
