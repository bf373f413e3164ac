"""A private one-node Slurm cluster in a temporary directory, for tests that need a real ``srun`` and ``sbatch``.

    python -m tools.cluster.slurm     # start one, print its SLURM_CONF, stop it on Ctrl-C (needs root)

It uses this machine's ``munged``, ``slurmctld`` and ``slurmd`` (Debian packages: slurmctld slurmd slurm-client
munge, plus libpmix-dev for ``srun --mpi=pmix``) and installs nothing. Everything it writes lives in its own
directory, so it neither reads nor disturbs a system Slurm or munge, nor another private cluster running at the
same time: ``slurm.conf`` (clients find it through ``SLURM_CONF``), a fresh munge key and socket, state, spool
and log directories, free TCP ports. Daemons are addressed as 127.0.0.1 only.

The node has this machine's CPUs and the settings of a small site without cgroups:
``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, ``SelectType=select/cons_tres`` (CPUs are the
consumable), ``MpiDefault=none`` (a plain ``srun`` starts tasks without any MPI wiring, as at many sites).
:meth:`SlurmCluster.stop` cancels what still runs and ends exactly the daemons :meth:`SlurmCluster.start`
started, by pid (then anything still tagged with this cluster's ``SLURM_CONF``: job steps that outlived them).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from typing_extensions import Self

from tools.bounded import run_bounded

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
#: where Debian (and most distributions) keep Slurm's plugins
PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu/slurm-wlm",
    "/usr/lib/aarch64-linux-gnu/slurm-wlm",
    "/usr/lib64/slurm",
    "/usr/lib/slurm",
    "/usr/local/lib/slurm",
)


def unavailable() -> str | None:
    """Why a private cluster cannot run here (``None``: it can)."""
    if not sys.platform.startswith("linux"):
        return "a private Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd starts job steps as their user)"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (
            f"Slurm or munge is not installed ({', '.join(missing)} not found); on Debian: "
            "apt-get install slurmctld slurmd slurm-client munge libpmix-dev"
        )
    return None


@functools.cache
def pmix_unavailable() -> str | None:
    """Why ``srun --mpi=pmix`` cannot work here (``None``: it can): Slurm's plugin or the PMIx library is missing."""
    if not any(Path(d, "mpi_pmix.so").exists() for d in PLUGIN_DIRS):
        return "Slurm's PMIx plugin (mpi_pmix.so) is not installed"
    # The plugin opens the library by this name (libpmix-dev provides it). Tried in another process: loaded here,
    # the system's libpmix.so.2 would shadow the one Open MPI's libraries need, and mpi4py could not load them.
    probe = subprocess.run(
        [sys.executable, "-c", "import ctypes; ctypes.CDLL('libpmix.so')"], capture_output=True, check=False, timeout=30
    )
    if probe.returncode != 0:
        return "Slurm's PMIx plugin cannot load libpmix.so: apt-get install libpmix-dev"
    return None


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login root shell may not have on PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    """One controller and one node on this machine, configured and run from ``root`` (created if missing).

    Use as a context manager (started on entry, stopped on exit, also on errors), or call :meth:`start` and
    :meth:`stop`. :attr:`env` is the environment that points Slurm's clients at this cluster.
    """

    def __init__(self, root: str | os.PathLike, cpus: int | None = None, kill_wait: int = 30) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait = kill_wait
        self.host = socket.gethostname().split(".")[0]  # slurmctld runs only where SlurmctldHost names it
        self.node = "node1"
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: dict[str, subprocess.Popen] = {}

    # -- environment and configuration ------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at this cluster and no inherited Slurm job.

        Slurm's clients read the munge socket from ``slurm.conf``; the ``SLURM_*`` and MPI variables of the
        caller (perhaps itself a Slurm job or an MPI rank) must not leak into the jobs submitted here.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env = {k: v for k, v in env.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "PRTE_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin"])
        return env

    def write_config(self) -> None:
        ctld_port, node_port = _free_ports(2)
        for sub in ("munge", "state", "spool", "log", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        log, run = self.root / "log", self.root / "state"
        settings = {
            "ClusterName": "lightningmpi",
            "SlurmctldHost": f"{self.host}(127.0.0.1)",
            "SlurmctldPort": ctld_port,
            "SlurmdPort": node_port,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": run,
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": run / "slurmctld.pid",
            "SlurmdPidFile": run / "slurmd.pid",
            "SlurmctldLogFile": log / "slurmctld.log",
            "SlurmdLogFile": log / "slurmd.log",
            "TmpFS": self.root / "tmp",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SchedulerType": "sched/builtin",
            "ReturnToService": 2,
            "KillWait": self.kill_wait,
            "InactiveLimit": 0,
            "MinJobAge": 300,
            "MailProg": "/bin/true",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
        }
        lines = [f"{name}={value}" for name, value in settings.items()]
        lines.append(f"NodeName={self.node} NodeHostname={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, and wait until the node is idle."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        try:
            self.write_config()
            munge = self.root / "munge"
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={self.munge_socket}",
                    f"--key-file={munge / 'munge.key'}",
                    f"--pid-file={munge / 'munged.pid'}",
                    f"--log-file={self.root / 'log' / 'munged.log'}",
                    f"--seed-file={munge / 'munged.seed'}",
                ],
            )
            self._wait(lambda: self.munge_socket.exists(), timeout, "munged to open its socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait(self._node_idle, timeout, f"node {self.node} to become idle")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, end the daemons this object started (by pid), then any job step left behind."""
        if self._daemons.get("slurmctld") is not None and self._daemons["slurmctld"].poll() is None:
            self.cancel_all()
            self._wait(lambda: not self.squeue(), min(timeout, self.kill_wait + 15), "jobs to end", quiet=True)
        for name in reversed(DAEMONS):  # slurmd, slurmctld, then munged, which the others talk to
            proc = self._daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: Sequence[str | None]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (the daemon holds it)
        try:
            self._daemons[name] = subprocess.Popen(
                [str(a) for a in argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the test run must not hit the daemons before stop() does
            )
        finally:
            out.close()

    def _wait(self, ready, timeout: float, what: str, quiet: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, proc in self._daemons.items() if proc.poll() is not None]
            if dead and not quiet:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        if not quiet:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")

    def _node_idle(self) -> bool:
        state = self.run(["sinfo", "--noheader", "--Node", "--format=%T"], check=False, timeout=10)
        return state.returncode == 0 and state.stdout.strip() == "idle"

    def leftover_pids(self) -> list[int]:
        """Processes (other than this one) whose environment names this cluster's ``SLURM_CONF``.

        Job steps carry it (they inherit the submitter's environment) and so do slurmstepd processes (they inherit
        slurmd's): after :meth:`stop` nothing should."""
        tag = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if tag in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
        return found

    def logs(self, lines: int = 30) -> str:
        """The last lines of every daemon's log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- clients -------------------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 60,
        check: bool = True,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command (``srun ...``, ``sbatch ...``) against this cluster, killed with its process group after
        ``timeout`` seconds (then the test fails with what it printed)."""
        # a timed-out srun's (or sbatch's, a sweep's) jobs would hold the node's CPUs until their time limit
        cancel = None if argv[0] == "scancel" else self.cancel_all
        result = run_bounded(argv, timeout, cwd=cwd, env={**self.env, **(env or {})}, on_timeout=cancel)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited with {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n"
                f"{result.stderr}"
            )
        return result

    def cancel_all(self) -> None:
        """Cancel every job of this cluster (all of them are this user's), batch scripts included."""
        with contextlib.suppress(AssertionError, OSError):
            self.run(["scancel", "--full", "--user", str(os.geteuid())], check=False, timeout=10)

    def squeue(self) -> list[tuple[str, str]]:
        """``(job id, state)`` of every job the controller still lists as pending or running."""
        listed = self.run(["squeue", "--noheader", "--format=%i %T"], check=False, timeout=10)
        return [tuple(line.split()) for line in listed.stdout.splitlines() if line.strip()]  # type: ignore[misc]

    def sbatch(
        self, argv: Sequence[str], cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None
    ) -> str:
        """Submit a batch job (``argv``: sbatch's options and the script); return its id."""
        submitted = self.run(["sbatch", "--parsable", *argv], cwd=cwd, env=env, timeout=30)
        return submitted.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        """``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``, ``TIMEOUT``, ``CANCELLED``... (with
        ``MinJobAge=300`` the controller remembers finished jobs for 5 minutes)."""
        shown = self.run(["scontrol", "show", "job", job], check=False, timeout=10)
        match = re.search(r"JobState=(\S+)", shown.stdout)
        return match.group(1) if match else "UNKNOWN"

    def job_info(self, job: str) -> dict[str, str]:
        """``scontrol show job``'s ``Key=Value`` pairs."""
        shown = self.run(["scontrol", "--oneliner", "show", "job", job], timeout=10)
        return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))

    def wait_job(self, job: str, timeout: float) -> str:
        """Wait until the job has ended and return its final state; cancel it and fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "UNKNOWN"):
                return state
            time.sleep(0.5)
        self.run(["scancel", job], check=False, timeout=10)
        raise AssertionError(f"job {job} did not end within {timeout} s (cancelled)\n{self.logs()}")


@contextlib.contextmanager
def private_cluster(root: str | os.PathLike | None = None) -> Iterator[SlurmCluster]:
    """A started :class:`SlurmCluster` in ``root`` (default: a new temporary directory, removed afterwards)."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="slurm-"))
        yield stack.enter_context(SlurmCluster(root))


def main() -> None:
    reason = unavailable()
    if reason:
        raise SystemExit(f"error: {reason}")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM too, and SIGINT explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with private_cluster() as cluster:
        print(f"Slurm is up: export SLURM_CONF={cluster.conf}   (Ctrl-C or SIGTERM stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
