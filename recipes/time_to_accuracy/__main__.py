"""``python -m recipes.time_to_accuracy [overrides]``: see :mod:`recipes.time_to_accuracy.run`."""

from recipes.time_to_accuracy.run import main

main()
