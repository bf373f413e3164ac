"""Tools shared by the tests, benchmarks and recipes (not part of the installed package): the emulated cluster,
a private Slurm cluster, and MPI launches bounded by a timeout."""
