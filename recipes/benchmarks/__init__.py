"""Benchmarks that compare variants side by side in one run: ``speed`` (epoch times against DDP, the ceiling and a
hand-written loop), ``distributed`` (torch.distributed over MPI against gloo), ``memory`` (per-rank memory
against the number of ranks). Each: ``python -m recipes.benchmarks.<name> --help``."""
