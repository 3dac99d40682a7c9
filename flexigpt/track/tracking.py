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
from flexigpt.track.uri import private_sqlite, tracking_uri

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
    uri = tracking_uri()
    private_sqlite(uri)  # runs hold params and paths: not for other users of the machine
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient()
    close_dead_runs(client, exp.experiment_id)
    parent = lineage.parent_run_id(client, exp.experiment_id)
    all_tags = {"flexigpt.stage": stage, PID_TAG: _pid_tag(), **lineage.common_tags(), **(tags or {})}
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


PID_TAG = "flexigpt.pid"  # host:pid of the stage process, so a later start can tell a killed run from a live one


def _pid_tag(pid: int | None = None) -> str:
    import socket

    return f"{socket.gethostname()}:{pid or os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose stage process is gone (kill -9, power loss); returns their ids."""
    import socket

    host, closed = socket.gethostname(), []
    try:
        runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    except Exception as e:  # noqa: BLE001  (housekeeping must never stop a stage)
        log.debug("could not list running runs: %s", e)
        return []
    for r in runs:
        h, _, pid = r.data.tags.get(PID_TAG, "").rpartition(":")
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    if closed:
        log.info("marked %d run(s) KILLED whose stage process is gone", len(closed))
    return closed


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
