"""Reusable data modules: time series (forecasting) and images (classification)."""
