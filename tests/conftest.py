"""The recipes' packages (``forecasting``, ``classification``) import here as the recipe scripts see them."""

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))

from tests.mpirun import Launch, launch_scenario  # noqa: E402 - after the recipes are on sys.path


@pytest.fixture(scope="session")
def suite_launches(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Launch]:
    """``suite_launches(world)``: the launch of every succeeding scenario on ``world`` ranks (one per session)."""
    launches: dict[int, Launch] = {}

    def launch(world: int) -> Launch:
        if world not in launches:
            out = tmp_path_factory.mktemp(f"suite{world}")
            launches[world] = launch_scenario("tests.scenarios.suite", world, out, timeout=900)
        return launches[world]

    return launch
