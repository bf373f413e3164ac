"""How ranks are combined: one policy object per ``MPIStrategy(sync=...)``.

A policy owns its options (keyword-only arguments of its class, validated there) and implements the hooks of
:class:`~lightning_mpi.policies.base.SyncPolicy`. ``MPIStrategy(sync="average", every_n_steps=8)`` and
``MPIStrategy(sync=ParameterAveraging(every_n_steps=8))`` build the same policy.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_mpi.policies.allreduce import GradientAllreduce
from lightning_mpi.policies.averaging import ParameterAveraging
from lightning_mpi.policies.base import SyncPolicy
from lightning_mpi.policies.ensemble import Ensemble, EnsembleModel, load_ensemble

#: The policy each ``sync`` name stands for.
POLICIES: dict[str, type[SyncPolicy]] = {
    GradientAllreduce.name: GradientAllreduce,
    ParameterAveraging.name: ParameterAveraging,
    Ensemble.name: Ensemble,
}


def options_of(policy: type[SyncPolicy]) -> list[str]:
    """The options a policy class takes (its keyword-only arguments), in their order.

    >>> options_of(Ensemble)
    ['voting', 'seed']
    """
    parameters = inspect.signature(policy.__init__).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def make_policy(sync: str | SyncPolicy, options: dict[str, Any]) -> SyncPolicy:
    """The policy of ``MPIStrategy(sync=..., **options)``: ``sync`` names a mode (``options`` go to its class) or
    is a policy object already (then there must be no ``options``).

    >>> type(make_policy("average", {"every_n_steps": 4})).__name__
    'ParameterAveraging'
    >>> make_policy("allreduce", {"voting": "soft"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: voting is not an option of MPIStrategy(sync='allreduce') (...); it belongs to sync='ensemble'.
    """
    if isinstance(sync, SyncPolicy):
        if options:
            raise ValueError(
                f"MPIStrategy(sync={type(sync).__name__}(...)) takes no mode options besides the policy object "
                f"(got {', '.join(options)}): give them to {type(sync).__name__}(...) itself."
            )
        return sync
    if sync not in POLICIES:
        raise ValueError(
            f"sync={sync!r} is not known: choose one of {', '.join(map(repr, POLICIES))}, or pass a policy object "
            "(lightning_mpi.policies)."
        )
    policy = POLICIES[sync]
    accepted = options_of(policy)
    for option in options:
        if option not in accepted:
            owners = [name for name, other in POLICIES.items() if option in options_of(other)]
            where = f"it belongs to sync={owners[0]!r}" if owners else "no mode takes it"
            raise ValueError(
                f"{option} is not an option of MPIStrategy(sync={sync!r}) ({policy.__name__} takes "
                f"{', '.join(accepted)}); {where}."
            )
    return policy(**options)


__all__ = [
    "POLICIES",
    "Ensemble",
    "EnsembleModel",
    "GradientAllreduce",
    "ParameterAveraging",
    "SyncPolicy",
    "load_ensemble",
    "make_policy",
    "options_of",
]
