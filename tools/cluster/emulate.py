"""An emulated cluster on this machine: nodes as Linux namespaces joined by bandwidth-limited links, and Open MPI
launching across them through a launch agent of ours instead of ssh (needs root).

    python -m tools.cluster.emulate up --rate 1gbit     # create one (2 nodes: node0, node1) and print how to use it
    python -m tools.cluster.emulate run -- mpirun --host node0:1,node1:1 -x PYTHONPATH python train.py
    python -m tools.cluster.emulate rate 10gbit         # change the links' rate ("none": unlimited)
    python -m tools.cluster.emulate measure             # link speed: raw TCP between the nodes, and MPI
    python -m tools.cluster.emulate down                # remove it (--all: every emulated cluster and leftover)

From Python (the tests use the ``emulated_cluster`` fixture)::

    with EmulatedCluster(rate="1gbit") as cluster:
        result = cluster.mpirun(["-m", "my.module", "arg"], per_node=1, timeout=300)   # python -m my.module arg
        cluster.set_rate("10gbit")

Layout (every name starts with ``lmpiemu-<tag>-``; nothing is added to the machine's own network namespace):

- one network namespace per node, with its own UTS namespace (its own host name: what ``MPI_Get_processor_name``
  and Open MPI's daemons report), interface ``eth0`` at ``10.213.0.<2+i>/24``, no route anywhere else, no IPv6;
- ``head``, where ``mpirun`` runs (``10.213.0.1``), so that Open MPI's control traffic stays inside too;
- ``switch``: a bridge joining one veth pair per node and one for the head;
- every node link shaped by ``tc qdisc tbf`` on both of its ends (the node's ``eth0`` for what the node sends, the
  switch's port for what it receives): a full-duplex link of ``rate`` each way, like a switched Ethernet port.
  ``burst`` is 1 ms at the rate (at least 64 KiB): a 25 MB message can beat the rate by at most that burst
  (0.5 % at 1 Gbit/s, 5 % at 10 Gbit/s), while a sender that loses the CPU for a moment still finds the tokens
  it missed (smaller buckets measured below the rate here: 32 KiB gave 0.8 Gbit/s at 1gbit, 64 KiB 1.8 Gbit/s
  at 10gbit); ``latency``: 20 ms of queue (no drops seen). The head's link is not shaped (control traffic only);
- each node's CPUs as a cgroup cpuset (``cpus="split"``: the machine's cores divided between the nodes), which
  Open MPI's hwloc sees as the node's cores (so it binds ranks within them), or, where no cpuset cgroup can be
  made, ``taskset`` on the daemon and no binding by Open MPI.

Open MPI reaches the nodes through PRRTE's ssh launcher, whose agent (MCA parameter ``plm_ssh_agent`` of PRRTE's
``plm/ssh`` component: ``PRTE_MCA_plm_ssh_agent`` in the environment or ``--prtemca plm_ssh_agent PATH``; Open
MPI 4 called it ``plm_rsh_agent``, and ``--mca plm_rsh_agent`` still works) is ``emulate_agent.sh``: it enters the
node's namespaces and cgroup and starts
the daemon with a bare environment (forward variables with ``mpirun -x``, as with ssh; ``mpirun`` itself forwards
``OMPI_MCA_*``). Every daemon is started from the head (``plm_ssh_no_tree_spawn``). TCP between ranks and daemons
is kept on the cluster's subnet (``btl_tcp_if_include``, ``oob_tcp_if_include``); ranks on one node share memory
(``sm``) as on a real node. Where a node has fewer cores than ranks, add ``--bind-to none`` or ``--map-by
slot:oversubscribe`` (not ``--oversubscribe``: with it Open MPI 5 maps every rank onto the first node). mpirun
may print ``plm:ssh: Warning: setpgid(...) failed in parent``: a harmless race (the agent had already started).

Measured here (2 cores; 25 MB, Gbit/s of TCP payload): 0.96 at ``1gbit`` (frames of 1500 bytes carry 94-96 % of
the rate), 7-9 at ``10gbit`` and ~10 unlimited: at 10 Gbit/s this machine's TCP stack, not tbf, is the limit.

Cleanup: :meth:`EmulatedCluster.stop` (also from ``atexit`` and on SIGTERM/SIGHUP, turned into
``KeyboardInterrupt``) kills every process in the cluster's namespaces and cgroups, deletes the namespaces (and
with them the links, the bridge and the qdiscs), unmounts the UTS namespaces and removes the cgroups and the state
directory. :func:`cleanup` finds leftovers by name (clusters whose owning process is gone, or all of them).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from typing_extensions import Self

PREFIX = "lmpiemu"
ROOT = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).with_name("emulate_agent.sh")
STATE = Path("/run") / PREFIX
NETNS = Path("/run/netns")
CGROUP_V1 = Path("/sys/fs/cgroup/cpuset")
CGROUP_V2 = Path("/sys/fs/cgroup")
TOOLS = ("ip", "tc", "unshare", "nsenter", "umount")
#: the tag of the cluster `python -m tools.cluster.emulate up` makes (it outlives that process, until `down`)
CLI_TAG = "cli"
_SUBNET = "10.213.0"
_BITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_counter = iter(range(1 << 30))


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    """Run a short system command (ip, tc, ...), bounded; fail with its stderr."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@functools.cache
def unavailable() -> str | None:
    """Why an emulated cluster cannot be made here (``None``: it can). Tries the kernel features once: a network
    and a UTS namespace, a veth pair and a tbf qdisc, all removed again."""
    if not sys.platform.startswith("linux"):
        return "an emulated cluster needs Linux namespaces"
    if os.geteuid() != 0:
        return "an emulated cluster needs root (network and UTS namespaces, tc)"
    if not os.access(AGENT, os.X_OK):
        return f"{AGENT} is not executable (chmod +x)"
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        return (
            f"{', '.join(missing)} not found: apt-get install iproute2 util-linux (ip and tc; unshare, nsenter "
            "and umount)"
        )
    probe = f"{PREFIX}-probe{os.getpid()}"
    uts = STATE / f"{probe}.uts"
    try:
        STATE.mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"])
        _run(
            [
                "tc",
                "-n",
                probe,
                "qdisc",
                "add",
                "dev",
                "pa",
                "root",
                "tbf",
                "rate",
                "1gbit",
                "burst",
                "128kb",
                "latency",
                "20ms",
            ]
        )
        uts.touch()
        _run(["unshare", f"--uts={uts}", "true"])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return f"this kernel or container cannot make the emulated nodes: {error}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
        if uts.exists():
            _run(["umount", str(uts)], check=False)
            uts.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            STATE.rmdir()
    return None


def parse_rate(rate: str | int | None) -> int | None:
    """A link rate in bits/s, from tc's notation (``"1gbit"``, ``"10gbit"``, ``"500mbit"``) or a number; ``None``
    (or ``"none"``) for an unlimited link.

    >>> parse_rate("10gbit"), parse_rate("2.5gbit"), parse_rate(None)
    (10000000000, 2500000000, None)
    """
    if rate is None or (isinstance(rate, str) and rate.lower() in ("none", "unlimited")):
        return None
    if isinstance(rate, int):
        bits = rate
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", rate.lower())
        if not match or match.group(2) not in _BITS:
            raise ValueError(f"rate={rate!r}: give bits per second as tc writes them (1gbit, 10gbit, 500mbit)")
        bits = int(float(match.group(1)) * _BITS[match.group(2)])
    if bits <= 0:
        raise ValueError(f"rate={rate!r} must be positive")
    return bits


def _format_rate(bits: int | None) -> str:
    if bits is None:
        return "unlimited"
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if bits >= _BITS[unit]:
            return f"{bits / _BITS[unit]:g}{unit}"
    return f"{bits}bit"


def _cgroup_mode() -> str | None:
    """``"v1"`` or ``"v2"`` where a cpuset cgroup can be made without changing the machine's hierarchy, else None."""
    if (CGROUP_V1 / "cgroup.procs").exists() and os.access(CGROUP_V1, os.W_OK):
        return "v1"
    with contextlib.suppress(OSError):
        if "cpuset" in (CGROUP_V2 / "cgroup.subtree_control").read_text().split() and os.access(CGROUP_V2, os.W_OK):
            return "v2"
    return None


def _cgroup_dir(mode: str, name: str) -> Path:
    return (CGROUP_V1 if mode == "v1" else CGROUP_V2) / name


def _cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def _ns_inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(namespaces: Sequence[Path | tuple[int, int]], cgroups: Sequence[Path] = ()) -> list[int]:
    """Processes (other than this one) in any of these network namespaces (paths, or the (device, inode) of ones
    already deleted) or cgroups."""
    wanted = {ns if isinstance(ns, tuple) else _ns_inode(ns) for ns in namespaces} - {None}
    found = set()
    for group in cgroups:
        with contextlib.suppress(OSError):
            found.update(int(p) for p in (group / "cgroup.procs").read_text().split())
    if wanted:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _ns_inode(entry / "ns" / "net") in wanted:
                found.add(int(entry.name))
    found.discard(os.getpid())
    return sorted(found)


def _kill_all(
    namespaces: Sequence[Path | tuple[int, int]], cgroups: Sequence[Path] = (), timeout: float = 10
) -> list[int]:
    """SIGKILL every process in these namespaces and cgroups until none is left (bounded); return those killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = _pids_in(namespaces, cgroups)
        if not pids or time.monotonic() > deadline:
            return sorted(killed)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.05)


def _owner_alive(tag: str) -> bool:
    match = re.fullmatch(r"p(\d+)x\d+", tag)
    if match is None:
        return True  # the CLI's cluster (or a name we do not know): only `down` / cleanup(everything=True) removes it
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_tags() -> list[str]:
    """Tags of every emulated cluster that has something on this machine (namespaces, state, cgroups)."""
    names = []
    for where in (NETNS, STATE, CGROUP_V1, CGROUP_V2):
        with contextlib.suppress(OSError):
            names += [p.name for p in where.iterdir()]
    tags = {m.group(1) for n in names if (m := re.match(rf"{PREFIX}-([A-Za-z0-9]+)-", n))}
    with contextlib.suppress(OSError):
        tags |= {p.name for p in STATE.iterdir() if p.is_dir()}
    return sorted(tags)


def remove(tag: str) -> None:
    """Remove everything of the emulated cluster ``tag``, found by name: processes in its namespaces and cgroups,
    the namespaces (with their links, bridge and qdiscs), the UTS namespaces' mounts, cgroups and state."""
    stem = f"{PREFIX}-{tag}-"
    state = STATE / tag
    shutil.rmtree(state / "hosts", ignore_errors=True)  # from now on the agent starts nothing on these nodes
    namespaces = sorted(NETNS.glob(stem + "*")) if NETNS.exists() else []
    inodes = [i for i in map(_ns_inode, namespaces) if i is not None]
    cgroups = [p for base in (CGROUP_V1, CGROUP_V2) if base.exists() for p in base.glob(stem + "*") if p.is_dir()]
    _kill_all(inodes, cgroups)
    for ns in namespaces:
        _run(["ip", "netns", "del", ns.name], check=False)
    _kill_all(inodes, cgroups, timeout=5)  # what entered a namespace while it was being deleted
    if state.exists():
        for uts in state.glob("*.uts"):
            _run(["umount", str(uts)], check=False)
        shutil.rmtree(state, ignore_errors=True)
    with contextlib.suppress(OSError):
        STATE.rmdir()  # when it was the last cluster
    for group in cgroups:
        for _ in range(50):  # a cgroup can be removed once its last process has been reaped
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                _kill_all([], [group], timeout=0.1)
                time.sleep(0.1)


def cleanup(everything: bool = False) -> list[str]:
    """Remove leftovers of emulated clusters whose owning process is gone (``everything``: of all of them, the
    CLI's and live ones too); return their tags."""
    removed = []
    for tag in leftover_tags():
        if everything or not _owner_alive(tag):
            remove(tag)
            removed.append(tag)
    return removed


@dataclass(frozen=True)
class Node:
    """One emulated node: its host name, address, network namespace and CPUs (``None``: every core)."""

    host: str
    address: str
    netns: str
    cpus: str | None

    @property
    def netns_path(self) -> Path:
        return NETNS / self.netns


class EmulatedCluster:
    """``nodes`` emulated nodes (a count, named ``node0``, ``node1``, ..., or their host names) joined by links of
    ``rate`` (see the module's docstring), and the head from which ``mpirun`` launches across them.

    Use as a context manager (created on entry, removed on exit, also on errors and interrupts), or call
    :meth:`start` and :meth:`stop`. Arguments:

    - ``rate``: each node link's rate per direction, tc notation (``"1gbit"``) or bits/s; ``None``: unlimited.
    - ``cpus``: ``"split"`` (the cores this process may use, divided into contiguous blocks, one per node; nodes
      share cores round-robin where there are fewer cores than nodes), ``"all"`` (every node sees every core) or
      one cpu list per node (``["0-3", "4-7"]``). :meth:`set_cpus` changes it for later launches.
    - ``mtu``: of every link (1500, Ethernet's default; 9000 for jumbo frames).
    - ``burst_ms``, ``latency_ms``: tbf's bucket (at the rate, at least 64 KiB) and queue, in milliseconds.
    """

    def __init__(
        self,
        nodes: int | Sequence[str] = 2,
        rate: str | int | None = "1gbit",
        *,
        cpus: str | Sequence[str] = "split",
        mtu: int = 1500,
        burst_ms: float = 1.0,
        latency_ms: float = 20.0,
        tag: str | None = None,
    ) -> None:
        hosts = [f"node{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        if not 1 <= len(hosts) <= 200 or len(set(hosts)) != len(hosts) or {"head", "switch"} & set(hosts):
            raise ValueError(f"nodes={nodes!r}: give 1 to 200 distinct host names (not 'head' or 'switch')")
        for host in hosts:
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", host):
                raise ValueError(f"host name {host!r}: lower-case letters, digits and '-', starting with a letter")
        self.tag = tag or f"p{os.getpid()}x{next(_counter)}"
        if not re.fullmatch(r"[A-Za-z0-9]+", self.tag):
            raise ValueError(f"tag={tag!r}: letters and digits only")
        self.state = STATE / self.tag
        self.mtu, self.burst_ms, self.latency_ms = mtu, burst_ms, latency_ms
        self.rate = parse_rate(rate)
        self.cgroup = _cgroup_mode()
        self.subnet = f"{_SUBNET}.0/24"
        self.head = Node("head", f"{_SUBNET}.1", self._ns("head"), None)
        self.switch = self._ns("switch")
        self.nodes = [Node(h, f"{_SUBNET}.{2 + i}", self._ns(h), None) for i, h in enumerate(hosts)]
        self.nodes = self._with_cpus(cpus)
        self._started = False
        self._previous_handlers: dict[int, object] = {}

    # -- names ---------------------------------------------------------------------------------------------

    def _ns(self, role: str) -> str:
        return f"{PREFIX}-{self.tag}-{role}"

    @property
    def hosts(self) -> list[str]:
        return [n.host for n in self.nodes]

    def node(self, host: str) -> Node:
        for n in self.nodes:
            if n.host == host:
                return n
        raise KeyError(f"{host} is not a node of this cluster ({', '.join(self.hosts)})")

    def _uts(self, node: Node) -> Path:
        return self.state / f"{node.host}.uts"

    def _cgroup_path(self, node: Node) -> Path | None:
        return _cgroup_dir(self.cgroup, node.netns) if self.cgroup else None

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the namespaces, links, qdiscs and cgroups (removing leftovers of dead clusters first)."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        cleanup()
        if self.tag in leftover_tags():  # never touch another live cluster's things
            raise RuntimeError(f"an emulated cluster tagged {self.tag!r} exists already")
        self._guard()
        try:
            self.state.mkdir(parents=True)
            (self.state / "hosts").mkdir()
            self._add_netns(self.switch)
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for index, node in enumerate([self.head, *self.nodes]):
                self._add_netns(node.netns)
                port = "p-head" if node is self.head else f"p-{index - 1}"
                _run(
                    [
                        "ip",
                        "link",
                        "add",
                        "name",
                        "eth0",
                        "netns",
                        node.netns,
                        "mtu",
                        str(self.mtu),
                        "type",
                        "veth",
                        "peer",
                        "name",
                        port,
                        "netns",
                        self.switch,
                        "mtu",
                        str(self.mtu),
                    ]
                )
                _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
                _run(["ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0"])
                _run(["ip", "-n", node.netns, "link", "set", "eth0", "up"])
                uts = self._uts(node)
                uts.touch()
                _run(["unshare", f"--uts={uts}", "sh", "-c", f"echo {node.host} > /proc/sys/kernel/hostname"])
            self._write_nodes()
            self._started = True
            self.set_rate(self.rate)
        except BaseException:
            self.stop()
            raise

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        # no IPv6: no link-local addresses, no neighbour discovery; the cluster speaks IPv4 on its subnet only
        script = (
            "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; "
            "do [ -e $f ] && echo 1 > $f; done; true"
        )
        _run(["nsenter", f"--net={NETNS / name}", "sh", "-c", script])

    def _write_nodes(self) -> None:
        """The agent's view of each node (its namespaces, cgroup, CPUs), and the nodes' cgroups."""
        parent_mems = "0"
        if self.cgroup == "v1":
            parent_mems = (CGROUP_V1 / "cpuset.mems").read_text().strip() or "0"
        for node in self.nodes:
            group = self._cgroup_path(node)
            cpus = node.cpus or _cpu_list(sorted(os.sched_getaffinity(0)))
            if group is not None:
                group.mkdir(exist_ok=True)
                if self.cgroup == "v1":
                    (group / "cpuset.mems").write_text(parent_mems)
                (group / "cpuset.cpus").write_text(cpus)
            lines = [
                str(node.netns_path),
                str(self._uts(node)),
                str(group / "cgroup.procs") if group is not None else "-",
                node.cpus or "-",
            ]
            (self.state / "hosts" / node.host).write_text("\n".join(lines) + "\n")

    def stop(self) -> None:
        """Remove everything this cluster made (idempotent; also after a partial :meth:`start`)."""
        try:
            remove(self.tag)
        finally:
            self._started = False
            self._unguard()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _guard(self) -> None:
        """Remove the cluster at interpreter exit, and turn SIGTERM/SIGHUP into KeyboardInterrupt (so that ``with``
        blocks and fixtures unwind) while it exists, where nobody else handles them."""
        atexit.register(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_DFL:
                self._previous_handlers[signum] = signal.signal(signum, _interrupt)

    def _unguard(self) -> None:
        atexit.unregister(self.stop)
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) is _interrupt:
                signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()

    # -- links and CPUs ------------------------------------------------------------------------------------

    def set_rate(self, rate: str | int | None) -> None:
        """Shape every node link to ``rate`` per direction (``None``: unlimited), from now on."""
        bits = parse_rate(rate)
        for index, node in enumerate(self.nodes):
            for ns, dev in ((node.netns, "eth0"), (self.switch, f"p-{index}")):
                if bits is None:
                    _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                    continue
                burst = max(int(bits / 8 * self.burst_ms / 1000), 64 * 1024)
                _run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        f"{bits}bit",
                        "burst",
                        str(burst),
                        "latency",
                        f"{self.latency_ms}ms",
                    ]
                )
        self.rate = bits

    def qdiscs(self) -> str:
        """``tc -s qdisc`` of every shaped interface, for reports."""
        parts = []
        for index, node in enumerate(self.nodes):
            for ns, dev in ((node.netns, "eth0"), (self.switch, f"p-{index}")):
                shown = _run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev], check=False).stdout.strip()
                parts.append(f"{node.host} {'sends' if dev == 'eth0' else 'receives'} ({dev}): {shown}")
        return "\n".join(parts)

    def _with_cpus(self, cpus: str | Sequence[str]) -> list[Node]:
        usable = sorted(os.sched_getaffinity(0))
        count = len(self.nodes)
        if cpus == "all":
            chosen: list[str | None] = [None] * count
        elif cpus == "split":
            if len(usable) >= count:
                size = len(usable) // count
                chosen = [_cpu_list(usable[i * size : (i + 1) * size]) for i in range(count)]
            else:
                chosen = [str(usable[i % len(usable)]) for i in range(count)]
        elif not isinstance(cpus, str) and len(cpus) == count:
            chosen = [str(c) for c in cpus]
        else:
            raise ValueError(f"cpus={cpus!r}: 'split', 'all' or one cpu list per node")
        return [Node(n.host, n.address, n.netns, c) for n, c in zip(self.nodes, chosen)]

    def set_cpus(self, cpus: str | Sequence[str]) -> None:
        """Give the nodes other CPUs (see the class's ``cpus``), for the launches that follow."""
        self.nodes = self._with_cpus(cpus)
        if self._started:
            self._write_nodes()

    @property
    def node_cpus(self) -> dict[str, list[int]]:
        """The cores of each node."""
        usable = sorted(os.sched_getaffinity(0))
        return {n.host: _parse_cpu_list(n.cpus) if n.cpus else usable for n in self.nodes}

    def link_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes each node has sent (``tx``) and received (``rx``) on its link so far (its ``eth0`` counters)."""
        counters = {}
        for node in self.nodes:
            shown = json.loads(_run(["ip", "-n", node.netns, "-s", "-j", "link", "show", "dev", "eth0"]).stdout)[0]
            stats = shown.get("stats64") or shown["stats"]
            counters[node.host] = {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}
        return counters

    # -- running things ------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment for ``mpirun`` on the head: this process's, without inherited MPI or Slurm launch
        variables, with the launch agent, TCP kept on the cluster's subnet, Open MPI allowed to run as root, and
        this repository on ``PYTHONPATH``."""
        drop = ("OMPI_", "PMIX_", "PMI_", "PRTE_", "SLURM_", "MPIR_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(
            {
                "LIGHTNING_MPI_EMULATED_CLUSTER": str(self.state),
                "PRTE_MCA_plm_ssh_agent": str(AGENT),
                "PRTE_MCA_plm_ssh_no_tree_spawn": "1",  # every daemon started from the head, through the agent
                "PRTE_MCA_oob_tcp_if_include": self.subnet,
                "OMPI_MCA_btl_tcp_if_include": self.subnet,
                "OMPI_MCA_btl": "^ofi",  # as in tests/mpirun.py: no libfabric probing
                "OMPI_ALLOW_RUN_AS_ROOT": "1",
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.cgroup is None:  # Open MPI would bind ranks to the machine's cores, not to the node's taskset
            env["PRTE_MCA_hwloc_default_binding_policy"] = "none"
        return env

    def in_head(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs on the head (where ``mpirun`` must run: it reaches the nodes only there)."""
        return ["nsenter", f"--net={self.head.netns_path}", f"--uts={self._uts(self.head)}", "--", *argv]

    def on_node(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs on node ``host`` as through ssh (its namespaces, its CPUs, a bare
        environment; the working directory is kept). Run it with :attr:`env`."""
        self.node(host)
        return [str(AGENT), host, shlex.join(argv)]

    def mpirun_command(
        self,
        argv: Sequence[str],
        per_node: int | Sequence[int] = 1,
        mpirun_args: Sequence[str] = (),
        forward: Sequence[str] = ("PYTHONPATH", "PYTHONUNBUFFERED"),
        python: str | None = sys.executable,
    ) -> list[str]:
        """``mpirun --host node0:N,node1:N -x VAR... MPIRUN_ARGS python ARGV`` on the head (``python=None``:
        ``argv`` is the whole program)."""
        from tools.mpirun import launcher

        mpirun, flavour = launcher()
        if flavour != "openmpi":
            raise RuntimeError("the emulated cluster launches through Open MPI's mpirun (PRRTE's ssh agent)")
        counts = [per_node] * len(self.nodes) if isinstance(per_node, int) else list(per_node)
        hosts = ",".join(f"{n.host}:{c}" for n, c in zip(self.nodes, counts) if c > 0)
        exported = [a for var in forward for a in ("-x", var)]
        program = [python, *argv] if python else list(argv)
        return self.in_head([mpirun, "--host", hosts, *exported, *mpirun_args, *program])

    def popen(
        self, command: Sequence[str], cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``command`` (from :meth:`mpirun_command`, :meth:`in_head`, :meth:`on_node`) with :attr:`env`
        (plus ``env``), output captured, in a session of its own."""
        return subprocess.Popen(
            list(command),
            cwd=cwd or ROOT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait(self, proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
        """Wait for a :meth:`popen` process; past ``timeout`` seconds kill it, its session and every process on the
        cluster (daemons, ranks), and fail with what it printed."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.reap()
            out, err = proc.communicate()
            raise AssertionError(
                f"{shlex.join(proc.args)} did not finish within {timeout} s\n--- stdout ---\n{out}\n--- stderr "
                f"---\n{err}"
            ) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def run(self, command: Sequence[str], timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
        """:meth:`popen` then :meth:`wait`."""
        return self.wait(self.popen(command, **kwargs), timeout)

    def mpirun(
        self,
        argv: Sequence[str],
        per_node: int | Sequence[int] = 1,
        mpirun_args: Sequence[str] = (),
        timeout: float = 180,
        env: dict[str, str] | None = None,
        **kwargs,
    ) -> subprocess.CompletedProcess:
        """Run ``python ARGV`` with ``per_node`` ranks on each node (see :meth:`mpirun_command`), bounded."""
        return self.run(self.mpirun_command(argv, per_node, mpirun_args, **kwargs), timeout=timeout, env=env)

    def pids(self, host: str | None = None) -> list[int]:
        """Processes on node ``host`` (``None``: anywhere on the cluster, head included)."""
        nodes = [self.node(host)] if host else [self.head, *self.nodes]
        return _pids_in([n.netns_path for n in nodes])

    def reap(self) -> list[int]:
        """Kill every process on the cluster (daemons and ranks left by a launch); return their pids."""
        nodes = [self.head, *self.nodes]
        groups = [g for g in map(self._cgroup_path, self.nodes) if g is not None]
        return _kill_all([n.netns_path for n in nodes] + [NETNS / self.switch], groups)

    def measure_tcp(
        self, source: str, sink: str, size: int = 25 * 2**20, repeats: int = 5, timeout: float = 120
    ) -> list[float]:
        """Seconds each of ``repeats`` transfers of ``size`` bytes takes over raw TCP (Python sockets) from node
        ``source`` to node ``sink`` (until the sink has acknowledged the last byte)."""
        port = "5201"
        module = ["-m", "tools.cluster.linkspeed"]
        receiver = self.popen(
            self.on_node(
                sink, [sys.executable, *module, "sink", self.node(sink).address, port, str(size), str(timeout)]
            )
        )
        try:
            sender = self.run(
                self.on_node(
                    source,
                    [
                        sys.executable,
                        *module,
                        "source",
                        self.node(sink).address,
                        port,
                        str(size),
                        str(repeats),
                        str(timeout),
                    ],
                ),
                timeout=timeout,
            )
        finally:
            done = self.wait(receiver, timeout=timeout)
        if sender.returncode != 0 or done.returncode != 0:
            raise RuntimeError(f"TCP measurement failed:\n{sender.stderr}\n{done.stderr}")
        return json.loads(sender.stdout.strip().splitlines()[-1])

    def describe(self) -> str:
        cpus = f"cgroup cpuset {self.cgroup}" if self.cgroup else "taskset"
        lines = [
            (
                f"emulated cluster {self.tag}: {len(self.nodes)} nodes, links {_format_rate(self.rate)} per "
                f"direction (tbf burst {self.burst_ms:g} ms, latency {self.latency_ms:g} ms, mtu {self.mtu}), "
                f"CPUs by {cpus}"
            )
        ]
        for n in self.nodes:
            lines.append(f"  {n.host:8s} {n.address:12s} cores {_cpu_list(self.node_cpus[n.host])}  netns {n.netns}")
        lines.append(f"  head     {self.head.address:12s} (mpirun)  netns {self.head.netns}")
        return "\n".join(lines)


def _parse_cpu_list(text: str) -> list[int]:
    """The CPUs of a cpu list as the kernel writes them.

    >>> _parse_cpu_list("0-2,5")
    [0, 1, 2, 5]
    """
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def emulated(**kwargs) -> Iterator[EmulatedCluster]:
    """A started :class:`EmulatedCluster` (arguments as for the class), removed afterwards."""
    with EmulatedCluster(**kwargs) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def emulated_cluster(request: pytest.FixtureRequest) -> Iterator[EmulatedCluster]:
    """A 2-node emulated cluster with 1 Gbit/s links for the test module that imports this fixture (skipped, with
    the reason, where none can be made). It changes the host while it exists, and says so on the console."""
    reason = unavailable()
    if reason:
        pytest.skip(f"no emulated cluster: {reason}")
    from tools.announce import announce

    announce(request, "building an emulated 2-node cluster on this host (network namespaces, veth links, tc, "
             "cgroup cpusets; removed afterwards, also when interrupted)")  # fmt: skip
    with emulated(rate="1gbit") as cluster:
        yield cluster


# -- command line ------------------------------------------------------------------------------------------


def _cli_cluster() -> EmulatedCluster:
    """The cluster `up` made, rebuilt from its state (its settings are in the state directory)."""
    saved = STATE / CLI_TAG / "cluster.json"
    if not saved.exists():
        raise SystemExit("error: no emulated cluster is up (python -m tools.cluster.emulate up)")
    settings = json.loads(saved.read_text())
    cluster = EmulatedCluster(
        settings["hosts"],
        settings["rate"],
        cpus=settings["cpus"],
        mtu=settings["mtu"],
        burst_ms=settings["burst_ms"],
        latency_ms=settings["latency_ms"],
        tag=CLI_TAG,
    )
    cluster._started = True
    return cluster


def _save_cli(cluster: EmulatedCluster) -> None:
    settings = {
        "hosts": cluster.hosts,
        "rate": cluster.rate,
        "mtu": cluster.mtu,
        "burst_ms": cluster.burst_ms,
        "latency_ms": cluster.latency_ms,
        "cpus": [n.cpus or _cpu_list(cluster.node_cpus[n.host]) for n in cluster.nodes],
    }
    (cluster.state / "cluster.json").write_text(json.dumps(settings))


def measure(cluster: EmulatedCluster, size: int = 25 * 2**20, repeats: int = 5, timeout: float = 300) -> dict:
    """Link speed at the cluster's current rate: raw TCP each way between the first two nodes, and MPI (a
    ping-pong and an ``Allreduce`` of ``size`` bytes, 1 rank per node). Gbit/s of payload, medians."""
    import statistics

    a, b = cluster.hosts[:2]

    def gbits(seconds: list[float]) -> float:
        return size * 8 / statistics.median(seconds) / 1e9

    forward = cluster.measure_tcp(a, b, size, repeats, timeout)
    backward = cluster.measure_tcp(b, a, size, repeats, timeout)
    before = cluster.link_bytes()
    launched = cluster.mpirun(["-m", "tools.cluster.linkspeed", "mpi", str(size), str(repeats)], timeout=timeout)
    after = cluster.link_bytes()
    if launched.returncode != 0:
        raise RuntimeError(f"MPI measurement failed:\n{launched.stdout}\n{launched.stderr}")
    mpi = json.loads(launched.stdout.strip().splitlines()[-1])
    return {
        "rate": _format_rate(cluster.rate),
        "size_bytes": size,
        f"tcp_{a}_to_{b}_gbit_s": gbits(forward),
        f"tcp_{b}_to_{a}_gbit_s": gbits(backward),
        "mpi_send_gbit_s": gbits(mpi["send"]),
        "mpi_allreduce_ms": 1e3 * statistics.median(mpi["allreduce"]),
        "mpi_link_bytes": {h: {k: after[h][k] - before[h][k] for k in ("tx", "rx")} for h in after},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster.emulate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the cluster (it stays until `down`)")
    up.add_argument("--rate", default="1gbit", help="each link's rate per direction (tc notation; 'none')")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--cpus", default="split", help="'split', 'all' or one cpu list per node, comma-free: 0-3/4-7")
    up.add_argument("--mtu", type=int, default=1500)
    sub.add_parser("down", help="remove the cluster").add_argument(
        "--all", action="store_true", help="every emulated cluster and leftover"
    )
    sub.add_parser("rate", help="change the links' rate").add_argument("rate")
    sub.add_parser("status", help="describe the cluster")
    run = sub.add_parser("run", help="run a command on the head (mpirun) with the cluster's environment")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    node = sub.add_parser("exec", help="run a command on a node, as through ssh")
    node.add_argument("host")
    node.add_argument("cmd", nargs=argparse.REMAINDER)
    meas = sub.add_parser("measure", help="measure the link speed (raw TCP and MPI) at one or more rates")
    meas.add_argument("--rate", nargs="*", help="rates to set and measure in turn (default: the current one)")
    meas.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    if args.command == "up":
        if (STATE / CLI_TAG).exists():
            raise SystemExit("error: an emulated cluster is already up (python -m tools.cluster.emulate down)")
        cpus = args.cpus if args.cpus in ("split", "all") else args.cpus.split("/")
        cluster = EmulatedCluster(args.nodes, args.rate, cpus=cpus, mtu=args.mtu, tag=CLI_TAG)
        cluster.start()  # removed again if interrupted while being made
        _save_cli(cluster)
        cluster._unguard()  # it outlives this process
        hosts = ",".join(f"{h}:1" for h in cluster.hosts)
        print(cluster.describe())
        print(f"\nrun:   python -m tools.cluster.emulate run -- mpirun --host {hosts} -x PYTHONPATH python train.py")
        print("stop:  python -m tools.cluster.emulate down")
        return
    if args.command == "down":
        removed = cleanup(everything=True) if args.all else ([CLI_TAG] if (STATE / CLI_TAG).exists() else [])
        if not args.all and removed:
            remove(CLI_TAG)
        print(f"removed: {', '.join(removed) or 'nothing'}")
        return
    cluster = _cli_cluster()
    if args.command == "status":
        print(cluster.describe())
        print(cluster.qdiscs())
    elif args.command == "rate":
        cluster.set_rate(args.rate)
        _save_cli(cluster)
        print(cluster.describe())
    elif args.command in ("run", "exec"):
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        command = cluster.in_head(cmd) if args.command == "run" else cluster.on_node(args.host, cmd)
        raise SystemExit(subprocess.run(command, env=cluster.env, check=False).returncode)
    elif args.command == "measure":
        for rate in args.rate or [cluster.rate]:
            cluster.set_rate(rate)
            print(json.dumps(measure(cluster, repeats=args.repeats)), flush=True)
        _save_cli(cluster)


if __name__ == "__main__":
    main()
