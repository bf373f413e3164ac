"""Ranks for Lightning, read from the MPI communicator."""

from __future__ import annotations

from collections.abc import Callable

from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from typing_extensions import override

from lightning_mpi.comm import Communicator, launched_by_mpi, launcher_rank, launcher_size, world


class MPICommEnvironment(ClusterEnvironment):
    """A :class:`ClusterEnvironment` whose ranks come from a :class:`~lightning_mpi.comm.Communicator`.

    Unlike Lightning's own choice of environment, SLURM variables never override MPI ranks here: ``mpirun``
    inside an ``sbatch`` allocation inherits ``SLURM_PROCID`` of the batch step, which is the same on every rank.
    The communicator is only created when a rank is first asked for, so building this object is free.
    """

    def __init__(self, factory: Callable[[], Communicator] = world) -> None:
        self._factory = factory
        self._communicator: Communicator | None = None

    @property
    def communicator(self) -> Communicator:
        if self._communicator is None:
            self._communicator = self._factory()
        return self._communicator

    @property
    def ready(self) -> bool:
        """Whether the communicator exists (creating it is a collective, done in ``setup_environment``)."""
        return self._communicator is not None

    def ready_communicator(self) -> Communicator | None:
        """The communicator if it exists already, else ``None`` (never creates it)."""
        return self._communicator

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    @override
    def main_address(self) -> str:
        return "localhost"

    @property
    @override
    def main_port(self) -> int:
        return 0

    @staticmethod
    @override
    def detect() -> bool:
        return launched_by_mpi()

    # Before the communicator exists (Trainer construction), ranks come from the launcher's variables: creating
    # it is a collective, which must not happen where ranks need not be in lockstep.

    @override
    def world_size(self) -> int:
        return self.communicator.size if self.ready else launcher_size()

    @override
    def set_world_size(self, size: int) -> None:
        """Ignored: the MPI launcher decides the world size."""

    @override
    def global_rank(self) -> int:
        return self.communicator.rank if self.ready else launcher_rank()

    @override
    def set_global_rank(self, rank: int) -> None:
        """Ignored: the MPI launcher decides the ranks."""

    @override
    def local_rank(self) -> int:
        return self.communicator.local_rank if self.ready else 0

    @override
    def node_rank(self) -> int:
        return self.communicator.node_rank if self.ready else 0


def given(communicator: Communicator) -> Communicator:
    """A communicator factory's body for ``MPIStrategy(communicator=...)`` (with ``functools.partial``: picklable)."""
    return communicator
