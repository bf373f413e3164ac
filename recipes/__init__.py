"""The recipes reproducing the studies lightning-mpi comes from: Hydra applications run from the repository root.

    python -m recipes.forecasting                  # LSTM / BiLSTM / GRU forecasting (recipes/forecasting/conf)
    python -m recipes.classification               # CNN ensembles, MLP speed-up, parallel k-fold
    python -m recipes.time_to_accuracy             # time to a target loss over emulated networks
    python -m recipes.forecasting.report DIR       # tables and plots of forecasting results
    python -m recipes.classification.report DIR    # tables and plots of classification results
    python -m recipes.benchmarks.speed | .distributed | .memory

Each runs the same under ``mpirun -n N python -m ...`` and ``srun --mpi=pmix python -m ...``. ``configs`` holds the
schemas the recipes share, ``runs`` the reading of ``result.json`` files the reports share.
"""
