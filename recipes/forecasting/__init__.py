"""Forecasting recipe: time-series data (SIR generator, NYT loader, windows, distributed scaling) and recurrent models."""
