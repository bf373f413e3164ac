"""Under mpirun: every scenario that must succeed, one after the other, in a single launch per world size.

A launch costs ~5 s of start-up (torch, Lightning, MPI) on every rank: one launch instead of six. A scenario that
fails ends the launch, and every test that reads its results (or a later scenario's) fails with what the ranks
printed. ``python -m tests.scenarios.suite OUT [SCENARIO ...]``.
"""

import sys
from pathlib import Path

from tests.helpers import run_scenarios
from tests.scenarios import checkpointing, collectives, combining, diloco, equivalence, evaluation, lightning_paths

SCENARIOS = {
    "collectives": collectives.main,
    "equivalence": equivalence.main,
    "combining": combining.main,
    "evaluation": evaluation.main,
    "checkpointing": checkpointing.main,
    "diloco": diloco.main,
    "lightning_paths": lambda out: lightning_paths.main(out, []),
}


def main(out: Path, names: list[str]) -> None:
    run_scenarios(SCENARIOS, out, names)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
