"""Tracking: MLflow runs (tracking), which code/params/data made a number (lineage), the store (uri)."""
