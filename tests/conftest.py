"""The recipes' packages (``forecasting``, ``classification``) import here as the recipe scripts see them."""

import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))
