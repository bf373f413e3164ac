"""The job's torch.distributed store: a ``TCPStore`` on rank 0 whose address travels over MPI.

The ``"mpi4py"`` backend itself needs no store. Other backends do: ``new_group(backend="gloo")`` (Lightning's
``prepare_data`` barrier, libraries that keep CPU collectives on gloo) exchanges its addresses through the default
group's store, and a store each process keeps to itself would leave them waiting forever. So the store is shared as
``init_method="env://"`` shares it under DDP, without ``MASTER_ADDR``/``MASTER_PORT``: rank 0 listens on a port
the system picks, and MPI tells every rank where; ranks on rank 0's node connect over the loopback, the others to
the first of rank 0's addresses they can reach (``MASTER_ADDR`` first, if set).
"""

from __future__ import annotations

import os
import socket
import struct
from datetime import timedelta

import torch.distributed as dist

from lightning_mpi.comm import Communicator

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def shared_store(comm: Communicator, timeout: timedelta) -> dist.Store:
    """A store every rank of ``comm`` shares (collective: every rank calls it)."""
    if comm.size == 1:
        return dist.HashStore()
    if comm.rank == 0:
        # every interface: ranks on other nodes connect to whichever address of this node they reach
        store = dist.TCPStore("0.0.0.0", 0, comm.size, is_master=True, timeout=timeout, wait_for_workers=False)  # noqa: S104
        comm.broadcast_object((store.port, _addresses()), 0)
        return store
    port, addresses = comm.broadcast_object(None, 0)
    candidates = ["127.0.0.1"] if comm.node_rank == 0 else addresses
    host = _first_reachable(candidates, port)
    if host is None:
        raise RuntimeError(
            f"lightning-mpi: rank {comm.rank} cannot reach rank 0's torch.distributed store on port {port} at any of "
            f"{', '.join(candidates)}. Set MASTER_ADDR to an address of rank 0's node that the other nodes reach "
            "over TCP."
        )
    return dist.TCPStore(host, port, comm.size, is_master=False, timeout=timeout)


def _addresses() -> list[str]:
    """Where other nodes may reach this one: ``MASTER_ADDR`` if set, the IPv4 addresses of its interfaces (not
    loopback), then its host name."""
    found = [os.environ["MASTER_ADDR"]] if os.environ.get("MASTER_ADDR") else []
    try:
        import fcntl

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                try:
                    request = struct.pack("256s", name[:15].encode())
                    found.append(socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24]))
                except OSError:  # an interface without an IPv4 address
                    continue
    except (ImportError, OSError):  # not Linux: the host name below
        pass
    found.append(socket.gethostname())
    return [a for a in dict.fromkeys(found) if not a.startswith("127.")]


def _first_reachable(hosts: list[str], port: int, seconds: float = 5.0) -> str | None:
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=seconds):
                return host
        except OSError:
            continue
    return None
