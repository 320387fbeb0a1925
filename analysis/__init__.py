"""Regenerate the papers' tables from the runs in MLflow."""
