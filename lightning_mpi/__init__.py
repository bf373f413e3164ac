"""lightning-mpi: PyTorch Lightning data-parallel training over MPI (mpi4py).

Importing this package never initialises MPI. What it does, all of it:

- registers ``Trainer(strategy="mpi")`` and the torch.distributed backend ``"mpi4py"`` with its ``mpi4py://``
  rendezvous (:mod:`lightning_mpi.distributed`);
- patches Lightning's ``MPIEnvironment.detect`` so that a process no MPI launcher started never loads MPI
  (:func:`lightning_mpi._lightning.keep_one_process_runs_away_from_mpi`), and filters one FutureWarning Lightning
  raises about itself (:data:`lightning_mpi._lightning.FOREIGN_WARNINGS`);
- under an MPI launcher: tells Lightning's rank-zero utilities the rank, keeps ranks > 0 from repeating Lightning's
  information messages (:mod:`lightning_mpi.console`), makes ``sys.stdout`` line-buffered (as stderr is, so
  that printed and logged lines keep their order) and filters Lightning's hint to prefix ``srun``; with several
  ranks, wraps ``Trainer.__init__`` to warn when a Trainer gets another strategy and to replace Lightning's
  progress bar by one line per epoch (:mod:`lightning_mpi.progress`).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_mpi import _lightning, console, distributed, progress
from lightning_mpi.checks import warn_about_plain_trainers
from lightning_mpi.comm import launched_by_mpi, launcher_rank, launcher_size
from lightning_mpi.metrics import sync_metrics
from lightning_mpi.policies import EnsembleModel, load_ensemble
from lightning_mpi.progress import EpochLines
from lightning_mpi.strategy import MPIStrategy
from lightning_mpi.voting import hard_vote, mean_vote, median_vote, soft_vote

MPIStrategy.register_strategies(StrategyRegistry)
distributed.register()
_lightning.keep_one_process_runs_away_from_mpi()
_lightning.ignore_foreign_warnings()

if launched_by_mpi():
    # Only rank 0 prints and logs from the first line of the script on (seed_everything, Trainer construction),
    # not just once the strategy is set up. The launcher's variables give the rank without initialising MPI.
    _lightning.set_rank_zero(launcher_rank())
    console.quiet_information(launcher_rank())
    console.line_buffered_stdout()
    _lightning.ignore_srun_hint()
    if launcher_size() > 1:
        warn_about_plain_trainers()
        _lightning.after_every_trainer_init(progress.use_epoch_lines_under_a_launcher)


__all__ = [
    "EnsembleModel",
    "EpochLines",
    "MPIStrategy",
    "hard_vote",
    "load_ensemble",
    "mean_vote",
    "median_vote",
    "soft_vote",
    "sync_metrics",
]
__version__ = "0.1.0"
