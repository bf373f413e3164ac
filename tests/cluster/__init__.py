"""A private one-node Slurm cluster for the tests (see :mod:`tests.cluster.slurm`)."""
