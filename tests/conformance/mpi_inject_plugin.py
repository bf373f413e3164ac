"""pytest plugin that runs Lightning's own test suite with ``lightning_mpi.MPIStrategy`` injected.

Loaded by ``tests/conformance/run.py`` into a pytest session whose rootdir is a Lightning source tree
(``python -m pytest -p mpi_inject_plugin --conformance inject ...``, with this directory on ``PYTHONPATH``).
It is never imported by the project's own test suite (``tests/conformance/conftest.py`` keeps pytest out).

What it does, once per session and per test:

* **Injection** (``--conformance inject``): ``_AcceleratorConnector.__init__`` (which every ``Trainer`` calls) is
  wrapped. A Trainer gets ``MPIStrategy(timeout=--conformance-stall-timeout)`` instead of what it asked for when
  ALL of these hold, and is left alone otherwise (the reason is recorded):

  - strategy is the default (``"auto"``/``None``) or exactly DDP: a string registered for ``DDPStrategy``
    (``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``, ``"ddp_find_unused_parameters_true"``, ...)
    or an instance whose type is exactly ``DDPStrategy`` (subclasses such as DeepSpeed, and FSDP, ``"single_device"``,
    ``SingleDeviceStrategy``, an ``MPIStrategy`` the test built itself: left alone);
  - the accelerator is CPU: ``"cpu"``, a ``CPUAccelerator``, or ``"auto"``/``None`` resolving to CPU at that moment
    (tests that mock CUDA/MPS/TPU availability resolve elsewhere and are left alone; ``"gpu"``, ``"cuda"``, ...
    are left alone);
  - ``num_nodes == 1``, and no ``ClusterEnvironment`` among ``plugins``;
  - ``devices`` asks for one CPU process (``"auto"``, ``None``, ``1``, ``"1"``) or exactly as many as the MPI world
    size (e.g. ``devices=2`` under ``mpirun -n 2``). Other counts (``devices=2`` at world size 1) are left alone:
    Lightning then runs its own DDP as in the reference run. ``devices`` is passed on unchanged.

  Precision, plugins and all other Trainer arguments are passed on unchanged.
  ``--conformance reference`` records the same decision per Trainer ("eligible") but injects nothing, and
  never imports ``lightning_mpi``.
* **MPI set-up before any test**: the lightning-mpi communicator (``lightning_mpi.comm.world()``; it starts the
  watchdog thread, which must exist before Lightning's thread-police fixture looks) and a private duplicate of
  ``COMM_WORLD`` for the harness itself.
* **Shared temporary directories**: rank 0 creates a base directory once and broadcasts it; ``tmp_path`` and
  ``tmpdir`` of a test are ``<base>/<name derived from the nodeid>``, the same path on every rank.
* **Ranks kept in step**: before each test every rank waits (non-blocking barrier on the harness communicator,
  bounded) until all ranks have finished the previous test, so one rank's collectives can never meet another
  test's collectives on another rank. The collected test lists are compared across ranks once.
* **Results**: ``<results>/rank<r>.jsonl``, one JSON object per line, flushed: a session header (paths of the
  imported ``lightning`` and ``lightning_mpi``), the collected test ids, ``start`` before a test, ``end`` after it
  (outcome ``passed``/``failed``/``error``/``skipped``, first line of the reason, the Trainers built and whether
  each was injected), and ``finished``. A ``start`` without ``end`` names the test that was running when the
  process died. With ``--conformance-log`` the rank's stdout/stderr (file descriptors 1 and 2) go to
  ``<results>/rank<r>.log``.
* **Memory guard**: ``RLIMIT_AS`` of ``--conformance-memory-gb`` per process, so a test that allocates without
  bound fails with ``MemoryError`` instead of taking the machine down.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

_STATE: _State | None = None


class _State:
    def __init__(self, config: pytest.Config) -> None:
        self.mode: str = config.getoption("conformance")
        self.stall_timeout: float = config.getoption("conformance_stall_timeout")
        self.barrier_timeout: float = config.getoption("conformance_barrier_timeout")
        self.skip_file: str | None = config.getoption("conformance_skip")
        self.rank = 0
        self.size = 1
        self.hcomm: Any = None
        self.base: Path | None = None
        self.out: Any = None
        self.current: str | None = None
        self.trainers: list[dict[str, Any]] = []
        self.reports: dict[str, pytest.TestReport] = {}
        self.started = 0.0
        self.mpi_strategy: Any = None

    def write(self, **event: Any) -> None:
        event.setdefault("t", round(time.time(), 3))
        self.out.write(json.dumps(event, default=str) + "\n")
        self.out.flush()


# -- options and set-up -------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "lightning-mpi conformance harness")
    group.addoption(
        "--conformance",
        choices=("reference", "inject", "ddp"),
        default=None,
        help="reference: record only; inject: give eligible Trainers an MPIStrategy; ddp: give them "
        "Lightning's DDPStrategy over gloo instead (the calibration: what DDP passes)",
    )
    group.addoption("--conformance-results", default=None, help="directory for rank<r>.jsonl (and rank<r>.log)")
    group.addoption("--conformance-skip", default=None, help="file of test ids (one per line) to deselect")
    group.addoption(
        "--conformance-stall-timeout",
        type=float,
        default=60.0,
        help="MPIStrategy(timeout=...) of injected strategies, seconds",
    )
    group.addoption(
        "--conformance-barrier-timeout",
        type=float,
        default=900.0,
        help="seconds a rank waits for the others between tests before aborting the job",
    )
    group.addoption("--conformance-tmp", default=None, help="parent of the shared temporary base directory")
    group.addoption("--conformance-memory-gb", type=float, default=8.0, help="RLIMIT_AS per process (0: none)")
    group.addoption("--conformance-log", action="store_true", help="send this rank's fd 1 and 2 to rank<r>.log")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    global _STATE
    if config.getoption("conformance") is None:
        return
    state = _STATE = _State(config)
    results = Path(config.getoption("conformance_results") or ".")
    results.mkdir(parents=True, exist_ok=True)

    lightning_mpi_file = None
    if state.mode == "inject":
        import lightning_mpi
        from lightning_mpi.comm import world
        from lightning_mpi.strategy import MPIStrategy

        lightning_mpi_file = lightning_mpi.__file__
        state.mpi_strategy = MPIStrategy
        # Created now, before any test: it initialises MPI (under a launcher) and starts the watchdog thread.
        world(state.stall_timeout)

    if _launched_by_mpi():
        from mpi4py import MPI

        state.hcomm = MPI.COMM_WORLD.Dup()  # the harness's own traffic never mixes with lightning-mpi's
        state.rank = state.hcomm.Get_rank()
        state.size = state.hcomm.Get_size()

    if config.getoption("conformance_log"):
        log = os.open(results / f"rank{state.rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)

    memory_gb = config.getoption("conformance_memory_gb")
    if memory_gb:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    base = None
    if state.rank == 0:
        base = tempfile.mkdtemp(prefix="lmpi-conformance-", dir=config.getoption("conformance_tmp"))
    if state.hcomm is not None:
        base = state.hcomm.bcast(base, root=0)
    state.base = Path(base)

    import lightning

    state.out = open(results / f"rank{state.rank}.jsonl", "a", buffering=1)  # noqa: SIM115 - open for the session
    state.write(
        event="session",
        rank=state.rank,
        size=state.size,
        mode=state.mode,
        pid=os.getpid(),
        host=os.uname().nodename,
        python=sys.executable,
        lightning=lightning.__file__,
        lightning_version=lightning.__version__,
        lightning_mpi=lightning_mpi_file,
        tmp_base=str(state.base),
        cwd=os.getcwd(),
        memory_gb=memory_gb,
        stall_timeout=state.stall_timeout,
        argv=sys.argv,
    )
    _patch_accelerator_connector(state)


def _launched_by_mpi() -> bool:
    # the same variables lightning_mpi.comm.launched_by_mpi reads; repeated so that reference runs need no import
    names = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS", "PALS_RANKID")
    return any(name in os.environ for name in names)


# -- injection ---------------------------------------------------------------------------------------------------


def _ddp_names() -> set[str]:
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    return {name for name, entry in StrategyRegistry.items() if entry["strategy"] is DDPStrategy}


def decide(
    strategy: Any, accelerator: Any, devices: Any, num_nodes: Any, plugins: Any, world_size: int
) -> tuple[bool, str]:
    """Whether a Trainer built with these arguments gets an MPIStrategy, and why (or why not)."""
    from lightning.fabric.accelerators.cpu import _parse_cpu_cores
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.fabric.utilities.device_parser import _select_auto_accelerator
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DDPStrategy

    if strategy is None or (isinstance(strategy, str) and strategy.lower() == "auto"):
        kind = "default strategy"
    elif isinstance(strategy, str) and strategy.lower() in _ddp_names():
        kind = f"strategy={strategy!r}"
    elif type(strategy) is DDPStrategy:
        kind = "DDPStrategy()"
    else:
        shown = repr(strategy) if isinstance(strategy, str) else type(strategy).__name__
        return False, f"strategy {shown} is neither the default nor DDP"

    if accelerator is None or (isinstance(accelerator, str) and accelerator.lower() == "auto"):
        resolved = _select_auto_accelerator()
        if resolved != "cpu":
            return False, f"accelerator 'auto' resolves to {resolved!r} (mocked or real)"
    elif isinstance(accelerator, str):
        if accelerator.lower() != "cpu":
            return False, f"accelerator={accelerator!r}"
    elif not isinstance(accelerator, CPUAccelerator):
        return False, f"accelerator {type(accelerator).__name__}"

    if num_nodes != 1:
        return False, f"num_nodes={num_nodes!r}"
    for plugin in plugins if isinstance(plugins, (list, tuple)) else [plugins]:
        if isinstance(plugin, ClusterEnvironment):
            return False, f"cluster environment plugin {type(plugin).__name__}"

    if devices is None or devices == "auto":
        count = 1
    else:
        try:
            count = _parse_cpu_cores(devices)
        except Exception:
            return False, f"devices={devices!r} is not a CPU process count"
    if count not in (1, world_size):
        return False, f"devices={count} CPU processes asked, MPI world size is {world_size}"
    return True, f"{kind}, CPU, devices={devices!r}"


def _patch_accelerator_connector(state: _State) -> None:
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    original = _AcceleratorConnector.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        try:
            eligible, why = decide(
                a["strategy"], a["accelerator"], a["devices"], a["num_nodes"], a["plugins"], state.size
            )
        except Exception as exc:
            eligible, why = False, f"harness could not decide: {type(exc).__name__}: {exc}"
        injected = eligible and state.mode in ("inject", "ddp")
        if injected and state.mode == "inject":
            a["strategy"] = state.mpi_strategy(timeout=state.stall_timeout)
        elif injected:  # DDP over gloo under the same launcher: one process per rank, Lightning's MPIEnvironment
            from datetime import timedelta

            from lightning.pytorch.strategies import DDPStrategy

            a["strategy"] = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=state.stall_timeout))
            a["devices"] = state.size
        record = {"eligible": eligible, "injected": injected, "why": why}
        state.trainers.append(record)
        state.write(event="trainer", nodeid=state.current, **record)  # known even if the test ends the job
        original(*bound.args, **bound.kwargs)

    _AcceleratorConnector.__init__ = init


# -- shared temporary directories --------------------------------------------------------------------------------


def _dirname(nodeid: str) -> str:
    digest = hashlib.sha1(nodeid.encode(), usedforsecurity=False).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::", 1)[-1])[:60]
    return f"{readable}-{digest}"


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Path:
    """The same directory on every rank: ``<base broadcast by rank 0>/<derived from the test id>``."""
    if _STATE is None:  # plugin loaded without --conformance: behave like pytest's own fixture
        factory = request.config._tmp_path_factory  # type: ignore[attr-defined]
        return factory.mktemp(_dirname(request.node.nodeid), numbered=True)
    assert _STATE.base is not None
    path = _STATE.base / _dirname(request.node.nodeid)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def tmpdir(tmp_path: Path) -> Any:
    from _pytest.compat import legacy_path

    return legacy_path(tmp_path)


# -- selection -----------------------------------------------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if _STATE is None or not _STATE.skip_file:
        return
    skip = set(Path(_STATE.skip_file).read_text().split("\n")) - {""}
    keep = [item for item in items if item.nodeid not in skip]
    dropped = [item for item in items if item.nodeid in skip]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    state = _STATE
    if state is None:
        return
    nodeids = [item.nodeid for item in session.items]
    state.write(event="collected", nodeids=nodeids)
    if state.hcomm is not None:
        digest = hashlib.sha1("\n".join(nodeids).encode(), usedforsecurity=False).hexdigest()
        digests = state.hcomm.allgather(digest)
        if len(set(digests)) != 1:
            state.write(event="abort", reason=f"ranks collected different tests: {digests}")
            print(f"[conformance] ranks collected different tests: {digests}", file=sys.stderr, flush=True)
            state.hcomm.Abort(5)


# -- per test ------------------------------------------------------------------------------------------------------


def _wait_for_all_ranks(state: _State, nodeid: str) -> None:
    request = state.hcomm.Ibarrier()
    deadline = time.monotonic() + state.barrier_timeout
    while not request.Test():
        if time.monotonic() > deadline:
            message = (
                f"[conformance] rank {state.rank}: the other ranks did not reach {nodeid} within "
                f"{state.barrier_timeout:g} s; aborting the job"
            )
            state.write(event="abort", nodeid=nodeid, reason=message)
            print(message, file=sys.stderr, flush=True)
            state.hcomm.Abort(4)
        time.sleep(0.002)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    state = _STATE
    if state is None:
        yield
        return
    if state.hcomm is not None:
        _wait_for_all_ranks(state, item.nodeid)
    state.current, state.trainers, state.reports = item.nodeid, [], {}
    state.started = time.monotonic()
    state.write(event="start", nodeid=item.nodeid)
    os.write(1, f"\n[conformance] start {item.nodeid}\n".encode())  # marks this test's part of rank<r>.log
    try:
        yield
    finally:
        outcome, when, reason = _outcome(state.reports)
        state.write(
            event="end",
            nodeid=item.nodeid,
            outcome=outcome,
            when=when,
            reason=reason,
            duration=round(time.monotonic() - state.started, 3),
            trainers=state.trainers,
        )
        state.current = None
        # A test that fails on one rank only (a warning Lightning gives on rank 0) skips its own clean-up on that rank;
        # global state it changed would then differ between the ranks for every later test (the default dtype: every
        # later model float64 on rank 1). The one process of the reference run passes such tests and cleans up.
        import torch

        torch.set_default_dtype(torch.float32)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _STATE is not None and _STATE.current == report.nodeid:
        _STATE.reports[report.when] = report


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, "Skipped: why")
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr or "")
    if getattr(report, "wasxfail", None) is not None:
        text = f"xfail: {report.wasxfail} {text}".strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    detail = _assertion_detail(str(longrepr)) if report.failed and "assert" in first else ""
    return (f"{first} [{detail}]" if detail else first)[:400]


def _assertion_detail(text: str) -> str:
    """pytest's explanation of a failed comparison, squeezed into a few words (it abbreviates long operands)."""
    explained = re.findall(r"^E[ \t]+(.*)$", text, re.MULTILINE)
    for line in explained:
        if line.startswith("At index") and "diff:" in line:
            names = re.findall(r"'name': '([^'\n]*)", line)  # the hook-call records of test_hooks.py
            head = line.split(" diff:")[0]
            return f"{head}: {names[0]} != {names[1]}" if len(names) >= 2 else line[:160]
        if line.startswith(("Left contains", "Right contains", "Extra items", "Differing items", "Omitting")):
            return line[:160]
    for line in explained:
        if line.lstrip("+ ").startswith("where "):
            return re.sub(r" id='\d+'", "", line.lstrip("+ "))[:160]
    return ""


def _outcome(reports: dict[str, pytest.TestReport]) -> tuple[str, str, str]:
    setup, call, teardown = reports.get("setup"), reports.get("call"), reports.get("teardown")
    if setup is None:
        return "error", "setup", "no setup report"
    if setup.failed:
        return "error", "setup", _reason(setup)
    if setup.skipped:
        return "skipped", "setup", _reason(setup)
    if call is None:
        return "error", "call", "no call report"
    if call.failed:
        return "failed", "call", _reason(call)
    if call.skipped:
        return "skipped", "call", _reason(call)
    if teardown is not None and teardown.failed:
        return "error", "teardown", _reason(teardown)
    return "passed", "call", ""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _STATE is not None and _STATE.out is not None:
        _STATE.write(event="finished", exitstatus=int(exitstatus))
