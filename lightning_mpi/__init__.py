"""lightning-mpi: PyTorch Lightning data-parallel training over MPI (mpi4py), without torch.distributed.

Importing this package registers ``Trainer(strategy="mpi")`` and never initialises MPI; it also keeps Lightning's
MPI detection from loading MPI in a process no MPI launcher started (:mod:`lightning_mpi._lightning`), and ranks
> 0 from repeating Lightning's messages on the console (:mod:`lightning_mpi.console`).
"""

from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from lightning_mpi import _lightning, console, distributed
from lightning_mpi.checkpoint import EnsembleModel, load_ensemble
from lightning_mpi.checks import warn_about_plain_trainers
from lightning_mpi.comm import launched_by_mpi, launcher_rank, launcher_size
from lightning_mpi.metrics import sync_metrics
from lightning_mpi.strategy import MPIStrategy
from lightning_mpi.voting import hard_vote, mean_vote, median_vote, soft_vote

MPIStrategy.register_strategies(StrategyRegistry)
distributed.register()
_lightning.keep_one_process_runs_away_from_mpi()
_lightning.ignore_foreign_warnings()

if launched_by_mpi():
    # Only rank 0 prints and logs from the first line of the script on (seed_everything, Trainer construction),
    # not just once the strategy is set up. The launcher's variables give the rank without initialising MPI.
    rank_zero_only.rank = utils_rank_zero_only.rank = launcher_rank()
    console.quiet_information(launcher_rank())
    if launcher_size() > 1:
        warn_about_plain_trainers()

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
