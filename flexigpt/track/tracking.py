"""MLflow tracking for stages: one run per executed stage, in a local ``sqlite:///`` store.

Only this module talks to MLflow, so the library itself runs without it. A stage that raises
ends its run with status FAILED.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flexigpt.config import flatten
from flexigpt.track.uri import tracking_uri

log = logging.getLogger(__name__)


class StageRun:
    """Thin handle over an active MLflow run."""

    parent_id: str | None = None

    def __init__(self, mlflow_mod: Any, run: Any) -> None:
        self._mlflow, self.run = mlflow_mod, run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        flat = {k: float(v) for k, v in flatten(metrics).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if flat:
            self._mlflow.log_metrics(flat, step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._mlflow.log_artifacts(str(p), artifact_path)
        elif p.exists():
            self._mlflow.log_artifact(str(p), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def summarise_pipeline(self, files: list[Path]) -> list[str]:
        """Attach ``files`` to the pipeline's parent run and add ``<stage> (cached)`` children for the
        stages DVC skipped; returns those stages (nothing outside a DVC execution)."""
        from flexigpt.track import lineage

        if not self.parent_id:
            return []
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        return lineage.link_cached_stages(self.client, self.experiment_id, self.parent_id, lineage.pipeline_stages())


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: dict[str, Any], tags: dict[str, Any] | None = None
              ) -> Iterator[StageRun]:
    """Open an MLflow run named ``stage`` in ``experiment``; mark it FAILED if the block raises."""
    import mlflow

    from flexigpt.track import lineage

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient()
    parent = lineage.parent_run_id(client, exp.experiment_id)
    all_tags = {"flexigpt.stage": stage, **lineage.common_tags(), **(tags or {})}
    if parent:
        all_tags[lineage.PARENT_TAG] = parent
    run = mlflow.start_run(run_name=stage, tags=all_tags)
    handle = StageRun(mlflow, run)
    handle.parent_id = parent
    handle.client = client
    handle.experiment_id = exp.experiment_id
    try:
        flat = {k: ("null" if v is None else str(v))[:500] for k, v in flatten(params).items()}
        for i in range(0, len(flat), 100):
            mlflow.log_params(dict(list(flat.items())[i:i + 100]))
        yield handle
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
    lineage.record_producer(stage, handle.run_id)


class NullRun(StageRun):
    """Stand-in on non-main processes: logs nothing."""

    def __init__(self) -> None:
        self.run = None

    @property
    def run_id(self) -> str:
        return ""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def summarise_pipeline(self, files: list[Path]) -> list[str]:
        return []


@contextlib.contextmanager
def null_run(stage: str, experiment: str, params: dict[str, Any], tags: dict[str, Any] | None = None
             ) -> Iterator[StageRun]:
    yield NullRun()
