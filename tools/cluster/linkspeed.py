"""Link speed between emulated nodes (see tools/cluster/emulate.py), every wait bounded.

    python -m tools.cluster.linkspeed sink ADDRESS PORT SIZE TIMEOUT              # on the receiving node
    python -m tools.cluster.linkspeed source ADDRESS PORT SIZE REPEATS TIMEOUT    # on the sending node
    mpirun ... python -m tools.cluster.linkspeed mpi SIZE REPEATS                 # 1 rank on each of 2 nodes

``source`` sends ``SIZE`` bytes ``REPEATS`` times over one TCP connection, each time until the sink acknowledges
the last byte, and prints the seconds of each transfer (JSON). ``mpi`` times a ping-pong of ``SIZE`` bytes
(``send``: seconds for one message one way) and an in-place ``Allreduce`` of ``SIZE`` bytes of float32 between
ranks 0 and 1; rank 0 prints JSON.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def sink(address: str, port: int, size: int, timeout: float) -> None:
    with socket.create_server((address, port)) as server:
        server.settimeout(timeout)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            buffer = memoryview(bytearray(1 << 20))
            while True:
                received = 0
                while received < size:
                    got = conn.recv_into(buffer, min(len(buffer), size - received))
                    if not got:
                        return
                    received += got
                conn.sendall(b"k")


def source(address: str, port: int, size: int, repeats: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:  # until the sink listens
        try:
            conn = socket.create_connection((address, port), timeout=timeout)
            break
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    payload = bytes(size)
    seconds = []
    with conn:
        for _ in range(repeats):
            start = time.perf_counter()
            conn.sendall(payload)
            if conn.recv(1) != b"k":
                raise RuntimeError("the sink closed the connection")
            seconds.append(time.perf_counter() - start)
    print(json.dumps(seconds), flush=True)


def mpi(size: int, repeats: int) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    assert comm.Get_size() == 2, "run on 2 ranks"
    data = np.ones(size // 4, dtype=np.float32)
    other = np.empty_like(data)
    peer = 1 - comm.rank
    send, allreduce = [], []
    for _ in range(repeats + 1):  # the first round opens the connections: not timed
        comm.Barrier()
        start = MPI.Wtime()
        if comm.rank == 0:
            comm.Send(data, peer)
            comm.Recv(other, peer)
        else:
            comm.Recv(other, peer)
            comm.Send(data, peer)
        send.append((MPI.Wtime() - start) / 2)
        comm.Barrier()
        start = MPI.Wtime()
        comm.Allreduce(MPI.IN_PLACE, data)
        allreduce.append(MPI.Wtime() - start)
    if comm.rank == 0:
        print(json.dumps({"send": send[1:], "allreduce": allreduce[1:], "host": MPI.Get_processor_name()}), flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "sink":
        sink(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif mode == "source":
        source(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]))
    else:
        mpi(int(args[0]), int(args[1]))
