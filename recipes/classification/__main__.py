"""``python -m recipes.classification [overrides]``: see :mod:`recipes.classification.train`."""

from recipes.classification.train import main

main()
