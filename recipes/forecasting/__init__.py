"""Forecasting recipe: time series (SIR generator, NYT loader, windows, distributed scaling) and recurrent models."""
