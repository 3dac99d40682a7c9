"""Where the MLflow store is (one place, read by tracking, lineage and the CLI)."""
from __future__ import annotations

import os
from pathlib import Path


def owning_project(root: Path) -> Path:
    """The project a DVC experiment workspace belongs to: ``dvc exp run --queue`` / ``--temp`` run a copy of
    the project in ``<project>/.dvc/tmp/exps/[standalone/]<tmp>/``, deleted afterwards; anywhere else, ``root``."""
    parts = root.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root.resolve()


def tracking_uri(root: Path | None = None) -> str:
    """``FLEXIGPT_MLFLOW_URI`` / ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project>/mlflow.db``.

    Queued and temp experiments write to their project's store, not to the copy DVC deletes, so a
    study's experiments show up as MLflow parent runs next to the workspace's.
    """
    uri = os.environ.get("FLEXIGPT_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{owning_project(root or Path.cwd()) / 'mlflow.db'}"


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
