"""Time-to-accuracy recipe: how long gradient allreduce and parameter averaging take to reach a target loss over
emulated networks (``python -m recipes.time_to_accuracy``; the logic is :mod:`recipes.time_to_accuracy.run`)."""
