"""How many torch threads a rank should use."""

from __future__ import annotations

import os
from typing import NamedTuple


class ThreadChoice(NamedTuple):
    number: int
    reason: str


def choose_threads(requested: int | None, ranks_on_node: int) -> ThreadChoice:
    """Threads for this rank: ``requested``, else ``OMP_NUM_THREADS``, else its cores shared by the node's ranks.

    A launcher that binds each rank to its own cores (Open MPI binds to one core per rank for two ranks or
    fewer) has already divided the node: the rank then uses all the cores it is bound to.

    >>> choose_threads(3, 4).number
    3
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_threads must be at least 1, got {requested}.")
        return ThreadChoice(requested, "num_threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return ThreadChoice(max(1, int(env.split(",")[0])), "OMP_NUM_THREADS")
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not a number of threads.") from None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = os.cpu_count() or usable
    if usable < total:
        return ThreadChoice(usable, f"{usable} core(s) this rank is bound to")
    count = max(1, usable // max(1, ranks_on_node))
    return ThreadChoice(count, f"{usable} core(s) / {ranks_on_node} rank(s) on this node")
