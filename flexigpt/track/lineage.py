"""Experiment lineage: one MLflow parent run per pipeline execution, a child run per stage.

A *pipeline execution* is one ``dvc repro`` / ``dvc exp run`` process: stages find it by walking
up their process tree to the ``dvc`` process (its pid + start time is the execution key). The
parent run is named after the DVC experiment (``DVC_EXP_NAME``) when there is one.

Each child run is tagged with the git commit and a dirty flag, the DVC stage hashes from
``dvc.lock``, package versions and (via the stages) the sha256 of every data file. Stages that
DVC skipped because they were cached appear as ``<stage> (cached)`` children that point at the
run that produced their outputs (``flexigpt.produced_by``); the registry of producers is
``.flexigpt/producers.json`` in the workspace.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

STATE_DIR = Path(".flexigpt")
PARENT_TAG = "mlflow.parentRunId"


def dvc_execution_key() -> str | None:
    """``<pid>-<start time>`` of the nearest ancestor ``dvc`` process, or None outside DVC."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    p = psutil.Process()
    for anc in p.parents():
        try:
            cmd = " ".join(anc.cmdline())
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "dvc" in Path(cmd.split(" ")[0]).name or " -m dvc" in cmd or "/dvc " in cmd + " ":
            return f"{anc.pid}-{int(anc.create_time())}"
    return None


def git_info(root: Path = Path(".")) -> dict[str, str]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = run("rev-parse", "HEAD") or "none"
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "lm_eval", "dvc", "mlflow", "flexigpt"):
        try:
            out[f"version.{pkg}"] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            out[f"version.{pkg}"] = "missing"
    return out


def dvc_lock_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """Per stage, a short hash over its deps/params/outs entries in dvc.lock."""
    import hashlib

    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"dvc.lock.{name}": hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()[:12]
            for name, entry in stages.items()}


def common_tags() -> dict[str, str]:
    tags = {**git_info(), **package_versions(), **dvc_lock_hashes()}
    for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        if os.environ.get(k):
            tags[f"dvc.{k.lower()}"] = os.environ[k]
    return tags


def _state(name: str) -> Path:
    STATE_DIR.mkdir(exist_ok=True)
    return STATE_DIR / name


def _read(name: str) -> dict[str, Any]:
    p = _state(name)
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _write(name: str, data: dict[str, Any]) -> None:
    p = _state(name)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, p)


def parent_run_id(client, experiment_id: str) -> str | None:
    """The parent run of the current pipeline execution, created on first use; None outside DVC."""
    key = dvc_execution_key()
    if key is None:
        return None
    st = _read("pipeline.json").get(_registry_key(), {})
    if st.get("key") == key and st.get("run_id"):
        return st["run_id"]
    name = os.environ.get("DVC_EXP_NAME") or time.strftime("repro %Y-%m-%d %H:%M:%S")
    run = client.create_run(experiment_id, run_name=name, tags={"flexigpt.kind": "pipeline", **common_tags()})
    client.set_terminated(run.info.run_id, "FINISHED")
    allst = _read("pipeline.json")
    allst[_registry_key()] = {"key": key, "run_id": run.info.run_id, "name": name}
    _write("pipeline.json", allst)
    return run.info.run_id


def _registry_key() -> str:
    from flexigpt.track.uri import tracking_uri

    return tracking_uri()


def record_producer(stage: str, run_id: str) -> None:
    """Remember which run last produced ``stage``'s outputs (for cached-stage links), per MLflow store."""
    reg = _read("producers.json")
    reg.setdefault(_registry_key(), {})[stage] = {"run_id": run_id, "time": time.time()}
    _write("producers.json", reg)


def link_cached_stages(client, experiment_id: str, parent_id: str, all_stages: list[str]) -> list[str]:
    """Add ``<stage> (cached)`` children for stages of this execution that DVC did not run."""
    ran = {r.data.tags.get("flexigpt.stage") for r in
           client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=500)}
    reg = _read("producers.json").get(_registry_key(), {})
    linked = []
    for stage in all_stages:
        if stage in ran or stage not in reg:
            continue
        run = client.create_run(experiment_id, run_name=f"{stage} (cached)",
                                tags={PARENT_TAG: parent_id, "flexigpt.stage": stage, "flexigpt.cached": "true",
                                      "flexigpt.produced_by": reg[stage]["run_id"]})
        client.set_terminated(run.info.run_id, "FINISHED")
        linked.append(stage)
    return linked


def pipeline_stages(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names as DVC shows them (``name@item`` for foreach stages)."""
    if not dvc_yaml.is_file():
        return []
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    out = []
    params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").is_file() else {}
    for name, body in stages.items():
        items = body.get("foreach") or body.get("matrix")
        if isinstance(items, str) and items.startswith("${"):
            node: Any = params
            for part in items.strip("${}").split("."):
                node = node.get(part, []) if isinstance(node, dict) else []
            items = node
        if isinstance(items, dict):
            items = list(items)
        if isinstance(items, list):
            out += [f"{name}@{i}" for i in items]
        else:
            out.append(name)
    return out


def find_run(client, what: str, stage: str | None = None):
    """A run by id, or the newest run that logged metric ``what`` (optionally of ``stage``)."""
    import re

    from mlflow.exceptions import MlflowException

    if re.fullmatch(r"[0-9a-f]{32}", what):
        try:
            return client.get_run(what)
        except MlflowException:
            return None
    exps = [e.experiment_id for e in client.search_experiments()]
    filt = f"metrics.`{what}` >= -1e300"
    if stage:
        filt += f" and tags.`flexigpt.stage` = '{stage}'"
    runs = client.search_runs(exps, filter_string=filt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def describe(client, run, metric: str | None = None) -> str:
    """Which code, params and data produced ``run`` (and ``metric`` in it)."""
    tags, lines = run.data.tags, []
    if tags.get("flexigpt.cached") == "true":
        lines.append(f"{run.info.run_name}: cached in this execution; produced by run {tags['flexigpt.produced_by']}")
        run = client.get_run(tags["flexigpt.produced_by"])
        tags = run.data.tags
    if metric:
        lines.append(f"metric   {metric} = {run.data.metrics[metric]:.6g}")
    parent = tags.get(PARENT_TAG)
    pname = client.get_run(parent).info.run_name if parent else "(run outside a DVC pipeline)"
    lines += [f"run      {run.info.run_name} ({run.info.run_id}), status {run.info.status}, "
              f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run.info.start_time / 1000))}",
              f"pipeline {pname}" + (f" ({parent})" if parent else ""),
              f"code     git {tags.get('git.commit', '?')} (dirty: {tags.get('git.dirty', '?')})"]
    stage = tags.get("flexigpt.stage", "").split("@")[0]
    locks = {k: v for k, v in tags.items() if k.startswith("dvc.lock.")}
    if locks:
        lines.append("dvc.lock " + ", ".join(f"{k[9:]}={v}" for k, v in sorted(locks.items())))
    lines.append("versions " + ", ".join(f"{k[8:]} {v}" for k, v in sorted(tags.items()) if k.startswith("version.")))
    runtime = {k[8:]: v for k, v in tags.items() if k.startswith("runtime.")}
    if runtime:  # bits depend on these as much as on code and params
        lines.append("runtime  " + ", ".join(f"{k} {v}" for k, v in sorted(runtime.items())))
    data = {k[12:]: v for k, v in tags.items() if k.startswith("data.sha256.")}
    if data:
        lines.append("data     " + "\n         ".join(f"{k}: sha256 {v}" for k, v in sorted(data.items())))
    groups = _stage_param_groups(stage)
    params = {k: v for k, v in sorted(run.data.params.items()) if not groups or k.split(".")[0] in groups
              or any(k.startswith(g + ".") or k == g for g in groups)}
    lines.append("params   " + "\n         ".join(f"{k} = {v}" for k, v in params.items()))
    return "\n".join(lines)


def _stage_param_groups(stage: str) -> list[str]:
    """Params a stage declares in dvc.yaml (what DVC re-runs it for)."""
    p = Path("dvc.yaml")
    if not stage or not p.is_file():
        return []
    body = (yaml.safe_load(p.read_text()) or {}).get("stages", {}).get(stage, {})
    body = body.get("do", body)
    return [x if isinstance(x, str) else next(iter(x)) for x in body.get("params", [])]
