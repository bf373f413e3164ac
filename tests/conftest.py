"""The launch of the multi-rank suite, shared by the test files whose rank code it runs (tests/mpi/suite.py)."""

from collections.abc import Callable

import pytest

from tests.mpirun import Launch, launch_scenario


@pytest.fixture(scope="session")
def suite_launches(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Launch]:
    """``suite_launches(world)``: the launch of every succeeding scenario on ``world`` ranks (one per session)."""
    launches: dict[int, Launch] = {}

    def launch(world: int) -> Launch:
        if world not in launches:
            out = tmp_path_factory.mktemp(f"suite{world}")
            launches[world] = launch_scenario("tests.mpi.suite", world, out, timeout=900)
        return launches[world]

    return launch


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def suite_launch(request: pytest.FixtureRequest, suite_launches: Callable[[int], Launch]) -> Launch:
    """The suite's launch on 2 ranks, then on 3: a test taking it runs at both world sizes."""
    return suite_launches(request.param)
