"""``python -m recipes.forecasting [overrides]``: see :mod:`recipes.forecasting.train`."""

from recipes.forecasting.train import main

main()
