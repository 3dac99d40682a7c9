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


def private_sqlite(uri: str) -> None:
    """Create a ``sqlite:///`` store file readable by its owner only (0600), or tighten an existing one."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
