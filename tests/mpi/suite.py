"""Under mpirun: the rank code of several test files, one after the other, in a single launch per world size.

A launch costs ~5 s of start-up (torch, Lightning, MPI) on every rank: one launch instead of seven. Each scenario's
rank code lives in its test file, beside the assertions on what it saved. A scenario that fails ends the launch,
and every test that reads its results (or a later scenario's) fails with what the ranks printed.
``python -m tests.mpi.suite OUT [SCENARIO ...]``.
"""

import sys
from pathlib import Path

from tests.helpers import run_scenarios
from tests.mpi import (
    test_allreduce,
    test_checkpoint,
    test_collectives,
    test_combining,
    test_diloco,
    test_evaluation,
    test_lightning_paths,
)

SCENARIOS = {
    "collectives": test_collectives.main,
    "equivalence": test_allreduce.main,
    "combining": test_combining.main,
    "evaluation": test_evaluation.main,
    "checkpointing": test_checkpoint.main,
    "diloco": test_diloco.main,
    "lightning_paths": lambda out: test_lightning_paths.main(out, []),
}


def main(out: Path, names: list[str]) -> None:
    run_scenarios(SCENARIOS, out, names)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
