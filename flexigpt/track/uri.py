"""Where the MLflow store is (one place, read by tracking, lineage and the CLI)."""
from __future__ import annotations

import os
from pathlib import Path


def tracking_uri(root: Path | None = None) -> str:
    """``FLEXIGPT_MLFLOW_URI`` / ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``."""
    uri = os.environ.get("FLEXIGPT_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"
