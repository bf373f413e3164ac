"""A private one-node Slurm cluster for the tests (see :mod:`tools.cluster.slurm`)."""
