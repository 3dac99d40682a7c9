"""DVC experiments as study inputs, and declarative studies as queued DVC experiments.

Reading: ``dvc exp show --json --no-fetch`` gives each experiment's name, git rev and params; its
per-sample files (``metrics/eval/samples/<variant>.json``, DVC-cached outputs of ``evaluate@<variant>``)
are found through the experiment's ``dvc.lock`` (its md5) in the local DVC cache, or, for experiments
made while they were git-tracked, with ``git show <rev>:<path>``; the workspace is read from disk.
Why cached: DVC saves no run-cache entry for a stage with an uncached plain output, and a study
needs the evaluations its experiments share restored rather than rerun.

Queuing: a study file ``configs/studies/NAME.yaml``::

    description: what the study answers
    sweep: {seed: [0, 1, 2], train.token_budget: [24576, 98304]}   # cartesian product
    set: {adapters.lora_on_kept: false}                            # optional, every experiment
    preset: configs/presets/eval_decisive.yaml                     # optional params fragment

becomes one ``dvc exp run --queue -S k=v ... -n NAME-...`` per combination. Every param must exist
in params.yaml and be declared by a stage in dvc.yaml, else DVC would queue a run that ignores it.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
import shlex
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flexigpt.errors import FlexiError
from flexigpt.report.study import Samples, rerun_fix, samples_from_dict, samples_relpath

STUDIES_DIR = "configs/studies"
DONE_STATES = (None, "success")  # executor states of finished experiments (None: run outside the queue)


# -- dvc exp show --------------------------------------------------------------------------------

def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params -> ``{"train.lr": 0.004, ...}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _params(entry: Mapping[str, Any], params_file: str) -> dict[str, Any]:
    data = ((entry.get("data") or {}).get("params") or {}).get(params_file) or {}
    return flatten(data.get("data") or {})


def parse_exp_show(rows: list[dict], params_file: str = "params.yaml") -> list[dict]:
    """``dvc exp show --json`` -> ``[{"name", "rev", "params", "state", "error"}]``: the workspace, then experiments.

    Layout (DVC 3.x): a list of baselines (``rev`` "workspace" or a commit) each with ``data.params``
    and ``experiments``: a list of ``{"name", "executor": {"state": ...} | null, "revs": [{"rev",
    "name", "data", "error"}]}``. Baseline commits themselves are not listed (the workspace is).
    """
    out: list[dict] = []
    for base in rows:
        if base.get("rev") == "workspace":
            out.append({"name": "workspace", "rev": "workspace", "params": _params(base, params_file),
                        "state": None, "error": base.get("error")})
        for exp in base.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            for r in exp.get("revs") or []:
                out.append({"name": r.get("name") or exp.get("name") or r["rev"][:7], "rev": r["rev"],
                            "params": _params(r, params_file), "state": state, "error": r.get("error")})
    return out


def _git_show(root: Path, rev: str, rel: str) -> str | None:
    """A file's text at a commit, or None when it is not there."""
    res = subprocess.run(["git", "show", f"{rev}:./{rel}"], cwd=root, capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


@functools.lru_cache(maxsize=8)
def _dvc_cache_dir(root: Path) -> Path:
    """The project's DVC cache (``dvc cache dir``: it may be configured elsewhere), else ``.dvc/cache``."""
    try:
        res = subprocess.run(["dvc", "cache", "dir"], cwd=root, capture_output=True, text=True)
    except OSError:  # dvc not on PATH
        return root / ".dvc" / "cache"
    return Path(res.stdout.strip()) if res.returncode == 0 and res.stdout.strip() else root / ".dvc" / "cache"


@functools.lru_cache(maxsize=64)
def _locked_md5s(root: Path, rev: str) -> dict[str, str]:
    """Output path -> md5 in a commit's dvc.lock (parsed once per commit: a report reads 4 files from each)."""
    lock = _git_show(root, rev, "dvc.lock")
    stages = ((yaml.safe_load(lock) or {}).get("stages") or {}) if lock else {}
    return {o["path"]: o["md5"] for st in stages.values() for o in st.get("outs") or [] if o.get("md5")}


def _cached_out_text(root: Path, rev: str, rel: str, experiment: str) -> str | None:
    """An output's text at a commit: its md5 from that commit's dvc.lock, its bytes from the DVC cache.

    None when the commit's dvc.lock has no such output; an error naming the fix when the cache lacks it.
    """
    md5 = _locked_md5s(root, rev).get(rel)
    if md5 is None:
        return None
    cache = _dvc_cache_dir(root)
    for obj in (cache / "files" / "md5" / md5[:2] / md5[2:], cache / md5[:2] / md5[2:]):  # DVC 3, DVC 2
        if obj.is_file():
            return obj.read_text()
    raise FlexiError(f"experiment {experiment}", f"{rel} (md5 {md5}) is not in the DVC cache {cache}",
                     f"fetch it with `dvc exp pull <remote> {experiment}`, or rerun the experiment")


def _read_text(root: Path, rev: str, rel: str, experiment: str = "workspace") -> str | None:
    if rev == "workspace":
        return (root / rel).read_text() if (root / rel).is_file() else None
    text = _git_show(root, rev, rel)  # experiments made while the file was git-tracked
    return text if text is not None else _cached_out_text(root, rev, rel, experiment)


def read_samples(root: Path, exp: Mapping[str, Any]) -> dict[str, Samples]:
    """Each evaluated variant's per-sample file of one experiment (variants: its ``evaluate.variants``)."""
    p = exp["params"]
    metrics_dir = str(p.get("paths.metrics_dir", "metrics"))
    variants = [k.split(".", 2)[2] for k in p if k.startswith("evaluate.variants.")]
    out: dict[str, Samples] = {}
    for v in variants:
        rel = samples_relpath(v, metrics_dir)
        text = _read_text(root, exp["rev"], rel, exp["name"])
        if text is None:
            headline = _read_text(root, exp["rev"], f"{metrics_dir}/eval/{v}.json", exp["name"])
            if headline and json.loads(headline).get("applicable") is False:
                continue  # e.g. ShortGPT in extend mode: evaluated as not applicable
            raise FlexiError(f"experiment {exp['name']}", f"{rel} is missing"
                             + ("" if exp["rev"] == "workspace" else f" at {exp['rev'][:7]}"),
                             rerun_fix(v, exp["name"]))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FlexiError(f"experiment {exp['name']}: {rel}", f"is not valid JSON ({e})",
                             rerun_fix(v, exp["name"])) from None
        if isinstance(data, dict) and data.get("applicable") is False:
            continue  # e.g. ShortGPT in extend mode: the stage writes {"applicable": false} and no samples
        out[v] = samples_from_dict(data, source=exp["name"], variant=v)
    return out


def _exp_show(root: Path, *extra: str) -> list[dict]:
    res = subprocess.run(["dvc", "exp", "show", "--json", "--no-fetch", *extra], cwd=root, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise FlexiError("dvc exp show", res.stderr.strip().splitlines()[-1] if res.stderr.strip() else
                         f"exit {res.returncode}", "run it from the project root with the venv active")
    return parse_exp_show(json.loads(res.stdout))


def list_experiments(root: str | Path, names: Iterable[str] | None = None) -> list[dict]:
    """Finished experiments of the current baseline (and the workspace), with params and samples.

    ``names`` selects experiments (``workspace`` included); by default every finished experiment
    plus the workspace when it has per-sample files.
    """
    root = Path(root)
    found = _exp_show(root)
    wanted = list(names) if names else None
    if wanted and not {n for n in wanted} <= {e["name"] for e in found}:
        found = _exp_show(root, "--all-commits")  # experiments of an earlier commit (results committed since)
    if wanted:
        known = {e["name"]: e for e in found}
        for n in wanted:
            if n not in known:
                raise FlexiError("--exp", f"no experiment named {n!r}", "pick from: " + ", ".join(known))
        found = [known[n] for n in wanted]
    out: list[dict] = []
    for e in found:
        if e["state"] not in DONE_STATES or e["error"]:
            if wanted:
                raise FlexiError(f"experiment {e['name']}", f"is {e['state'] or 'failed'}"
                                 + (f" ({e['error']})" if e["error"] else ""),
                                 "wait for `dvc queue status` to show it done (start it: `dvc queue start -j 1`)")
            continue  # queued / running / failed: nothing to read yet
        if e["name"] == "workspace" and not wanted and not (root / samples_relpath("flexigpt", str(
                e["params"].get("paths.metrics_dir", "metrics")))).parent.is_dir():
            continue  # a workspace never evaluated with per-sample output is not part of the study
        out.append({**e, "samples": read_samples(root, e)})
    return out


# -- declarative studies -------------------------------------------------------------------------

@dataclass(frozen=True)
class Study:
    """A parsed, validated study file."""

    name: str
    description: str
    sweep: dict[str, list[Any]]
    set: dict[str, Any]
    preset: str | None
    overrides: list[dict[str, str]]   # one ordered {param: -S value} per experiment


def declared_params(dvc_yaml: Mapping[str, Any]) -> set[str]:
    """Every params key a stage of dvc.yaml lists (sections as their names; foreach stages' ``do``)."""
    keys: set[str] = set()
    for stage in (dvc_yaml.get("stages") or {}).values():
        body = stage.get("do", stage) if isinstance(stage, Mapping) else {}
        for item in body.get("params") or []:
            if isinstance(item, str):
                keys.add(item)
            elif isinstance(item, Mapping):  # {params_file: [keys]}: only params.yaml counts here
                for f, ks in item.items():
                    if f == "params.yaml":
                        keys.update(ks or [])
    return keys


def _exists(params: Mapping[str, Any], key: str) -> bool:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_param(key: str, params: Mapping[str, Any], declared: set[str], where: str) -> None:
    """A swept/set param must exist in params.yaml and be declared by a stage (a section counts for its keys)."""
    if not _exists(params, key):
        raise FlexiError(key, f"({where}) is not a key of params.yaml",
                         "use a dotted key that params.yaml has (e.g. train.token_budget)")
    if not any(key == d or key.startswith(d + ".") or d.startswith(key + ".") for d in declared):
        raise FlexiError(key, f"({where}) is in params.yaml but no stage in dvc.yaml declares it, so an experiment "
                         "that changes it would rerun nothing", "sweep a param some stage lists under `params:`")


def _hydra_value(v: Any) -> str:
    from flexigpt.config import hydra_value  # the same value syntax `flexigpt preset` prints

    return hydra_value(v)


def load_study(path: str | Path, root: str | Path = ".") -> Study:
    """Parse and validate ``configs/studies/NAME.yaml`` against root's params.yaml and dvc.yaml."""
    from flexigpt.config import preset_flags

    path, root = Path(path), Path(root)
    if not path.is_file():
        have = sorted(p.stem for p in (root / STUDIES_DIR).glob("*.yaml"))
        raise FlexiError("study", f"{path} does not exist", f"pick one of: {', '.join(have) or '(none)'}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or set(spec) - {"description", "sweep", "set", "preset"}:
        raise FlexiError(str(path), "must be a mapping with description, sweep and optional set / preset",
                         f"remove the keys {sorted(set(spec) - {'description', 'sweep', 'set', 'preset'})}"
                         if isinstance(spec, dict) else "see configs/studies/seeds.yaml")
    if not isinstance(spec.get("description"), str):
        raise FlexiError(f"{path}: description", "missing", "say in one line what the study answers")
    sweep, fixed = spec.get("sweep"), spec.get("set") or {}
    if not isinstance(sweep, dict) or not sweep or not all(isinstance(v, list) and v for v in sweep.values()):
        raise FlexiError(f"{path}: sweep", "must map each param to a non-empty list of values",
                         "e.g. sweep: {seed: [0, 1, 2]}")
    if not isinstance(fixed, dict):
        raise FlexiError(f"{path}: set", "must map params to values", "e.g. set: {adapters.lora_on_kept: false}")
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    declared = declared_params(yaml.safe_load((root / "dvc.yaml").read_text()) or {})
    base: dict[str, str] = {}
    preset = spec.get("preset")
    if preset is not None:
        if not (root / str(preset)).is_file():
            raise FlexiError(f"{path}: preset", f"{preset} does not exist", "point it at a file in configs/presets/")
        flags = preset_flags(str(root / str(preset)), str(root / "params.yaml"))
        base.update(f.split("=", 1) for f in flags[1::2])  # type: ignore[arg-type]
    for k in base:
        check_param(k, params, declared, f"preset {preset}")
    for k in fixed:
        check_param(str(k), params, declared, "set")
    for k in sweep:
        check_param(str(k), params, declared, "sweep")
        if k in fixed:
            raise FlexiError(str(k), "is both swept and set", "keep it in one of sweep / set")
    base.update({str(k): _hydra_value(v) for k, v in fixed.items()})  # set overrides the preset
    overrides = [{**base, **{str(k): _hydra_value(v) for k, v in zip(sweep, combo)}}
                 for combo in itertools.product(*sweep.values())]
    return Study(path.stem, spec["description"], {str(k): v for k, v in sweep.items()}, fixed,
                 None if preset is None else str(preset), overrides)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_.")


def exp_name(study: Study, override: Mapping[str, str]) -> str:
    """``budget-seed1-token_budget98304``: the study and each swept param's last key part and value."""
    parts = [f"{k.rsplit('.', 1)[-1]}{_slug(override[k])}" for k in study.sweep]
    return "-".join([study.name, *parts])


def study_commands(study: Study) -> list[list[str]]:
    """One ``dvc exp run --queue`` argv per combination of the sweep."""
    cmds = []
    for o in study.overrides:
        cmd = ["dvc", "exp", "run", "--queue"]
        for k, v in o.items():
            cmd += ["-S", f"{k}={v}"]
        cmds.append(cmd + ["-n", exp_name(study, o)])
    return cmds


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
