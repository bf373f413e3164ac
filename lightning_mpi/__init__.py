"""lightning-mpi: PyTorch Lightning data-parallel training over MPI (mpi4py), without torch.distributed.

Importing this package registers ``Trainer(strategy="mpi")`` and never initialises MPI.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_mpi.checkpoint import EnsembleModel, load_ensemble
from lightning_mpi.metrics import sync_metrics
from lightning_mpi.strategy import MPIStrategy
from lightning_mpi.voting import hard_vote, mean_vote, median_vote, soft_vote

MPIStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "EnsembleModel",
    "MPIStrategy",
    "hard_vote",
    "load_ensemble",
    "mean_vote",
    "median_vote",
    "soft_vote",
    "sync_metrics",
]
__version__ = "0.1.0"
