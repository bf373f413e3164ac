"""Run a selection of Lightning's own tests three ways and collect per-test outcomes.

    python -m tests.conformance.run --lightning-src /work/lightning-src --ranks 1 2 --out /tmp/conformance \
        [--lightning-mpi-path /tmp/lmpi-base] [--report /tmp/conformance/conformance.md]

Configurations (each a pytest session with ``mpi_inject_plugin`` loaded, cwd ``<src>/tests/tests_pytorch``):

* ``reference``: ``python -m pytest`` in one process, Trainers keep the strategy they ask for;
* ``ws1``: ``python -m pytest`` with MPIStrategy injected (``--ranks 1``);
* ``ws<n>``: ``mpirun -n <n> python -m pytest`` with MPIStrategy injected, every rank running the same session.

When a session dies before its end (a test ended the MPI job, a crash, the wall-clock limit), the test that was
running is recorded as "ended the job" and a new session starts with every test that already ran deselected, until
all tests have run. Results: ``<out>/<config>/results.json`` (plus the raw per-rank files under ``part<k>/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).resolve().parent

#: The selection, relative to ``<lightning-src>/tests/tests_pytorch``. ``checkpointing/test_legacy_checkpoints.py``
#: is left out: it needs the legacy checkpoints downloaded into ``tests/legacy/checkpoints``.
DEFAULT_SELECTION = [
    "strategies/test_common.py",
    "trainer/logging_",
    "checkpointing/test_model_checkpoint.py",
    "checkpointing/test_trainer_checkpoint.py",
    "checkpointing/test_checkpoint_callback_frequency.py",
    "callbacks/test_early_stopping.py",
    "callbacks/test_gradient_accumulation_scheduler.py",
    "trainer/optimization",
    # the wider selection: callbacks that touch ranks, the loops, the tuner, trainer flags and connectors, loggers,
    # the LightningModule core and the model tests
    "callbacks/progress",
    "callbacks/test_lr_monitor.py",
    "callbacks/test_prediction_writer.py",
    "callbacks/test_pruning.py",
    "callbacks/test_stochastic_weight_avg.py",
    "callbacks/test_weight_averaging.py",
    "callbacks/test_timer.py",
    "callbacks/test_finetuning_callback.py",
    "loops",
    "tuner",
    "trainer/flags",
    "trainer/connectors",
    "loggers",
    "core",
    "models",
    "--ignore=models/test_onnx.py",  # needs onnx, which Lightning's tests install separately
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightning-src", required=True, type=Path, help="a Lightning source tree (its tests)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2], help="world sizes with injection")
    parser.add_argument(
        "--ddp-ranks",
        type=int,
        nargs="*",
        default=[],
        help="world sizes with Lightning's DDPStrategy over gloo injected instead (the calibration)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the default-strategy reference run")
    parser.add_argument(
        "--lightning-mpi-path",
        type=Path,
        default=None,
        help="directory put first on PYTHONPATH so that `import lightning_mpi` resolves there "
        "(e.g. a git worktree of another commit); checked inside every session",
    )
    parser.add_argument(
        "--tests",
        nargs="*",
        default=None,
        help="test paths or ids relative to tests/tests_pytorch (default: the standard selection)",
    )
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--test-timeout", type=float, default=180, help="pytest-timeout per test, seconds")
    parser.add_argument("--stall-timeout", type=float, default=60, help="MPIStrategy(timeout=...) when injected")
    parser.add_argument(
        "--barrier-timeout",
        type=float,
        default=None,
        help="seconds a rank waits for the others at the next test before it ends the job (default: 2 x the test "
        "timeout + 120; lower it where ranks diverge often and wait in collectives without a limit, as DDP's do)",
    )
    parser.add_argument("--session-timeout", type=float, default=3600, help="wall-clock limit per session, seconds")
    parser.add_argument("--memory-gb", type=float, default=8, help="address-space limit per process (0: none)")
    parser.add_argument("--max-restarts", type=int, default=300, help="sessions per configuration, at most")
    parser.add_argument("--mpirun", default=shutil.which("mpirun") or shutil.which("mpiexec") or "mpirun")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the tests' shared temporary directories")
    parser.add_argument("--report", type=Path, default=None, help="also write the markdown report there")
    args = parser.parse_args(argv)

    src = args.lightning_src.resolve()
    cwd = src / "tests" / "tests_pytorch"
    if not (cwd / "conftest.py").is_file():
        parser.error(f"{cwd} is not Lightning's tests_pytorch directory")
    tests = args.tests if args.tests is not None else DEFAULT_SELECTION
    args.out = args.out.resolve()  # sessions run in Lightning's tests directory
    args.out.mkdir(parents=True, exist_ok=True)

    configs: list[tuple[str, int, str]] = [] if args.no_reference else [("reference", 1, "reference")]
    configs += [(f"ws{n}", n, "inject") for n in args.ranks]
    configs += [(f"ddp{n}", n, "ddp") for n in args.ddp_ranks]
    for label, size, mode in configs:
        started = time.monotonic()
        result = run_config(args, label, size, mode, cwd, tests, src)
        counts = _count(result)
        print(
            f"[conformance] {label}: {counts} in {time.monotonic() - started:.0f} s "
            f"({len(result['sessions'])} session(s))",
            flush=True,
        )
    if args.report:
        from tests.conformance.report import write_report

        write_report(args.out, args.report)
        print(f"[conformance] report: {args.report}", flush=True)
    return 0


def _count(result: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for test in result["tests"].values():
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return counts


def _env(args: argparse.Namespace, size: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):  # never inherit a launcher's identity (the runner itself might run under one)
        if name.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_")):
            del env[name]
    path = [str(args.lightning_mpi_path.resolve())] if args.lightning_mpi_path else []
    path.append(str(HARNESS))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*path, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if size > 1:
        env.update(
            {
                "OMPI_ALLOW_RUN_AS_ROOT": "1",
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_btl": env.get("OMPI_MCA_btl", "^ofi"),
                "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
            }
        )
    return env


def _command(
    args: argparse.Namespace, size: int, mode: str, part: Path, skip: Path, tmp: Path, tests: list[str]
) -> list[str]:
    pytest_argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "mpi_inject_plugin",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "--color=no",
        "-q",
        "-s",
        f"--timeout={args.test_timeout:g}",
        "--conformance",
        mode,
        "--conformance-results",
        str(part),
        "--conformance-skip",
        str(skip),
        "--conformance-stall-timeout",
        f"{args.stall_timeout:g}",
        "--conformance-memory-gb",
        f"{args.memory_gb:g}",
        "--conformance-barrier-timeout",
        f"{args.barrier_timeout or 2 * args.test_timeout + 120:g}",
        "--conformance-log",
        "--conformance-tmp",
        str(tmp),
    ]
    if args.keyword:
        pytest_argv += ["-k", args.keyword]
    pytest_argv += tests
    if size == 1:
        return pytest_argv
    return [args.mpirun, "-n", str(size), "--oversubscribe", *pytest_argv]


def _read_rank_files(part: Path) -> dict[int, list[dict[str, Any]]]:
    ranks: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(part.glob("rank*.jsonl")):
        events = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a dying process
                events.append(json.loads(line))
        ranks[int(path.stem[4:])] = events
    return ranks


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning|Timeout|Failed)\b.*")


def _death_reason(part: Path, rank: int, nodeid: str) -> str | None:
    """What this rank printed when the job ended during ``nodeid`` (from its log, after that test's marker)."""
    log = part / f"rank{rank}.log"
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")
    marker = f"[conformance] start {nodeid}"
    text = text[text.rfind(marker) :] if marker in text else text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("[lightning-mpi] rank") and "failed:" in line:
            block = []
            for follow in lines[i + 1 :]:
                if follow.startswith(("[lightning-mpi]", "MPI_ABORT", "----", "[conformance]")):
                    break
                block.append(follow)
            exceptions = [b for b in block if _EXCEPTION_LINE.match(b) and not b.startswith("Traceback")]
            return f"aborted the job on {exceptions[-1][:300]}" if exceptions else line[:300]
        if line.startswith(("[lightning-mpi] rank", "[conformance] rank")):
            return line[:300]
    for line in lines:
        if line.startswith(("Fatal Python error", "Segmentation fault", "MemoryError")):
            return line[:300]
    return None


def _session_reason(log: Path) -> str | None:
    """How mpirun saw the end of the job (which rank called MPI_Abort or died of a signal)."""
    if not log.is_file():
        return None
    text = " ".join(log.read_text(errors="replace").split())
    found = re.search(r"process rank (\d+) with PID \d+ on node \S+ calling \"abort\"", text)
    if found:
        return f"rank {found.group(1)} called MPI_Abort"
    found = re.search(r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)( \([^)]*\))?", text)
    if found:
        return f"rank {found.group(1)} died of signal {found.group(2)}{found.group(3) or ''}"
    found = re.search(r"session killed at its wall-clock limit of \S+ s", text)
    return found.group(0) if found else None


def run_config(
    args: argparse.Namespace, label: str, size: int, mode: str, cwd: Path, tests: list[str], src: Path
) -> dict[str, Any]:
    root = args.out / label
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tmp_root = root / "tmp"
    tmp_root.mkdir()
    skip = root / "skip.txt"
    skip.write_text("")
    result: dict[str, Any] = {
        "label": label,
        "world_size": size,
        "mode": mode,
        "order": [],
        "tests": {},
        "sessions": [],
        "lightning_src": str(src),
        "settings": {
            "test_timeout": args.test_timeout,
            "stall_timeout": args.stall_timeout,
            "memory_gb": args.memory_gb,
            "session_timeout": args.session_timeout,
            "tests": tests,
            "keyword": args.keyword,
        },
    }
    done: list[str] = []
    started = time.monotonic()
    for k in range(args.max_restarts):
        part = root / f"part{k}"
        part.mkdir()
        command = _command(args, size, mode, part, skip, tmp_root, tests)
        t0 = time.monotonic()
        with open(part / "session.log", "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            proc = subprocess.Popen(
                command, cwd=cwd, env=_env(args, size), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=args.session_timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                timed_out = True
                log.write(f"\n[conformance] session killed at its wall-clock limit of {args.session_timeout:g} s\n")
        # whatever is left of the process group (spawned workers) goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.monotonic() - t0
        ranks = _read_rank_files(part)
        headers = {r: next((e for e in ev if e["event"] == "session"), None) for r, ev in ranks.items()}
        _check_imports(args, src, headers)
        if not args.keep_tmp:
            for header in headers.values():
                if header and header.get("tmp_base"):
                    shutil.rmtree(header["tmp_base"], ignore_errors=True)
        if k == 0:
            result["lightning"] = next((h["lightning"] for h in headers.values() if h), None)
            result["lightning_mpi"] = next((h["lightning_mpi"] for h in headers.values() if h), None)

        collected = next((e["nodeids"] for e in ranks.get(0, []) if e["event"] == "collected"), None)
        session: dict[str, Any] = {
            "part": k,
            "rc": rc,
            "seconds": round(seconds, 1),
            "ended_by": None,
            "timed_out": timed_out,
        }
        result["sessions"].append(session)
        if collected is None:
            session["error"] = "no collected test list (collection failed or the job died before it)"
            print(f"[conformance] {label} part{k}: {session['error']}; see {part / 'session.log'}", flush=True)
            break
        if k == 0:
            result["order"] = list(collected)

        ends = {r: {e["nodeid"]: e for e in ev if e["event"] == "end"} for r, ev in ranks.items()}
        starts = {r: {e["nodeid"] for e in ev if e["event"] == "start"} for r, ev in ranks.items()}
        finished = all(any(e["event"] == "finished" for e in ev) for ev in ranks.values()) and len(ranks) == size
        progressed = False
        for nodeid in collected:
            if all(nodeid in ends.get(r, {}) for r in range(size)):
                result["tests"][nodeid] = _combine({r: ends[r][nodeid] for r in range(size)})
                done.append(nodeid)
                progressed = True
        remaining = [n for n in collected if n not in result["tests"]]
        if finished or not remaining:
            if remaining:
                session["error"] = f"{len(remaining)} collected test(s) did not run"
            print(f"[conformance] {label} part{k}: finished in {seconds:.0f} s (rc {rc})", flush=True)
            break
        running = [n for n in remaining if any(n in starts.get(r, set()) for r in range(size))]
        victim = running[0] if running else remaining[0]
        reasons = {}
        for r in range(size):
            if victim in ends.get(r, {}):
                end = ends[r][victim]
                reasons[r] = {"outcome": end["outcome"], "reason": end["reason"]}
            else:
                why = _death_reason(part, r, victim)
                if why is None:
                    why = (
                        "did not start the test"
                        if victim not in starts.get(r, set())
                        else "killed while running the test (the job ended elsewhere)"
                    )
                reasons[r] = {"outcome": "ended", "reason": why}
        job = (
            f"session wall-clock limit of {args.session_timeout:g} s"
            if timed_out
            else _session_reason(part / "session.log") or f"exit code {rc}"
        )
        trainers = [e for e in ranks.get(0, []) if e["event"] == "trainer" and e.get("nodeid") == victim]
        trainers = [{key: t[key] for key in ("eligible", "injected", "why")} for t in trainers]
        result["tests"][victim] = {
            "outcome": "ended",
            "ranks": reasons,
            "job": job,
            "trainers": trainers,
            "injected": any(t["injected"] for t in trainers),
            "eligible": any(t["eligible"] for t in trainers),
        }
        if not running:
            result["tests"][victim]["job"] += " (the job died between tests)"
        done.append(victim)
        session["ended_by"] = victim
        print(
            f"[conformance] {label} part{k}: job ended during {victim} after {seconds:.0f} s: "
            + "; ".join(f"rank {r}: {v['reason']}" for r, v in reasons.items()),
            flush=True,
        )
        skip.write_text("\n".join(done) + "\n")
        if all(n in result["tests"] for n in result["order"]):
            break
        if not progressed and not running:
            session["error"] = "no progress; giving up on the remaining tests"
            break
    result["seconds"] = round(time.monotonic() - started, 1)
    for nodeid in result["order"]:
        result["tests"].setdefault(nodeid, {"outcome": "not run", "ranks": {}, "injected": False})
    if not args.keep_tmp:
        shutil.rmtree(tmp_root, ignore_errors=True)
    (root / "results.json").write_text(json.dumps(result, indent=1))
    return result


def _check_imports(args: argparse.Namespace, src: Path, headers: dict[int, dict[str, Any] | None]) -> None:
    for rank, header in headers.items():
        if header is None:
            continue
        lightning = Path(header["lightning"]).resolve()
        if lightning.is_relative_to(src):
            raise SystemExit(f"rank {rank} imported lightning from the source tree ({lightning}), not the installed")
        if args.lightning_mpi_path and header.get("lightning_mpi"):
            mpi = Path(header["lightning_mpi"]).resolve()
            if not mpi.is_relative_to(args.lightning_mpi_path.resolve()):
                raise SystemExit(f"rank {rank} imported lightning_mpi from {mpi}, not from {args.lightning_mpi_path}")


def _combine(per_rank: dict[int, dict[str, Any]]) -> dict[str, Any]:
    outcomes = {e["outcome"] for e in per_rank.values()}
    if outcomes == {"passed"}:
        outcome = "passed"
    elif "failed" in outcomes:
        outcome = "failed"
    elif "error" in outcomes:
        outcome = "error"
    elif outcomes == {"skipped"}:
        outcome = "skipped"
    else:  # passed on some ranks, skipped on others
        outcome = "failed"
    return {
        "outcome": outcome,
        "ranks": {
            r: {"outcome": e["outcome"], "reason": e["reason"], "when": e["when"], "duration": e["duration"]}
            for r, e in per_rank.items()
        },
        "trainers": per_rank[0]["trainers"],
        "injected": any(t["injected"] for e in per_rank.values() for t in e["trainers"]),
        "eligible": any(t["eligible"] for e in per_rank.values() for t in e["trainers"]),
    }


if __name__ == "__main__":
    sys.exit(main())
