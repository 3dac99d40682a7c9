"""Zero-shot evaluation through lm-eval on an in-memory model, from local (offline) data files.

Each task is lm-eval's own built-in task YAML, ``include:``d by absolute path from a small
generated YAML that renames it (``arc_easy`` -> ``arc_easy_local``) and overrides only the data
source (``dataset_path: json`` + ``data_files``) and the split names. Prompts, choices, targets,
``process_docs`` and metrics therefore stay exactly lm-eval's. lm-eval's YAML loader resolves a
``!function utils.f`` tag relative to the directory of the YAML file that contains it, and an
``include:`` loads the included file with its own directory, so the built-in ``utils.py`` files
(hellaswag, winogrande, wikitext) resolve without being copied.

Paper metric (FlexiGPT Tables 1-5, the SliceGPT convention)::

    headline(task) = acc_norm if the task reports it, else acc      (WinoGrande: acc)
    paper_average  = mean over {arc_easy, arc_challenge, piqa, winogrande, hellaswag} of headline

BoolQ is evaluated for reference but is not part of the paper average.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flexigpt.errors import FlexiError
from flexigpt.model.forward import check_dtype, compute_context


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task evaluated from a local jsonl file."""

    builtin: str     # built-in YAML, relative to lm_eval/tasks/
    data_file: str   # relative to the data dir
    split: str       # the split name the file is registered under: "test" or "validation"


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "arc_easy/test.jsonl", "test"),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", "arc_challenge/test.jsonl", "test"),
    "piqa": TaskSpec("piqa/piqa.yaml", "piqa/validation.jsonl", "validation"),
    "winogrande": TaskSpec("winogrande/default.yaml", "winogrande/validation.jsonl", "validation"),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "hellaswag/validation.jsonl", "validation"),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "boolq/validation.jsonl", "validation"),
}
"""The zero-shot tasks (accuracy)."""

EXTRA_TASKS: dict[str, TaskSpec] = {
    "wikitext": TaskSpec("wikitext/wikitext.yaml", "wikitext2/test_document_level.jsonl", "test"),
}
"""lm-eval's document-level WikiText-2 (word/byte perplexity); not part of the accuracy tables."""

ALL_TASKS: dict[str, TaskSpec] = {**TASKS, **EXTRA_TASKS}
PAPER_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag")
REFERENCE_LIMITS: dict[str, int | None] = {"hellaswag": 2000, "boolq": 1000}
"""Docs per task of the reference protocol (first N docs; tasks not listed: all docs)."""

LOCAL_SUFFIX = "_local"
NON_METRICS = frozenset({"name", "alias", "sample_len"})  # lm-eval's per-task bookkeeping fields
SPLITS = ("training_split", "validation_split", "test_split")

Limit = int | None | Mapping[str, int | None]


def local_name(task: str) -> str:
    return f"{task}{LOCAL_SUFFIX}"


# -- validation (all of it runs before any model work) -------------------------------------------

def check_tasks(tasks: str | Iterable[str], param: str = "evaluate.tasks") -> list[str]:
    """Known task names, de-duplicated in order; an unknown name lists the valid ones."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise FlexiError(param, "no tasks given", f"list some of: {', '.join(ALL_TASKS)}")
    bad = [t for t in names if t not in ALL_TASKS]
    if bad:
        raise FlexiError(param, f"unknown task(s) {bad}", f"use some of: {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(names))


def _check_one_limit(v: Any, param: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise FlexiError(param, f"must be a whole number of docs or null, got {v!r}",
                         f"set `{param}` to e.g. 100, or null for every doc")
    if v <= 0:
        raise FlexiError(param, f"must be >= 1, got {v}", f"set `{param}` to a positive number of docs, "
                                                            "or null for every doc")
    return int(v)


def check_limits(limit: Limit, tasks: list[str], param: str = "evaluate.limit") -> dict[str, int | None]:
    """Per-task doc limits (first N docs; None = all) from an int, None or a {task: int|None} dict."""
    if isinstance(limit, Mapping):
        bad = [t for t in limit if t not in tasks]
        if bad:
            raise FlexiError(param, f"has limits for tasks that are not evaluated: {bad}",
                             f"use keys from: {', '.join(tasks)}")
        return {t: _check_one_limit(limit.get(t), f"{param}.{t}") for t in tasks}
    one = _check_one_limit(limit, param)
    return {t: one for t in tasks}


def check_batch_size(batch_size: Any, param: str = "evaluate.batch_size") -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FlexiError(param, f"must be a whole number >= 1, got {batch_size!r}", f"set `{param}` to e.g. 8")
    return batch_size


def data_files(data_dir: str | Path, tasks: Iterable[str], param: str = "data.dir") -> dict[str, Path]:
    """Absolute path of each task's local data file; a missing file is named in the error."""
    root = Path(data_dir).expanduser()
    out: dict[str, Path] = {}
    for t in tasks:
        p = (root / ALL_TASKS[t].data_file).resolve()
        if not p.is_file():
            raise FlexiError(param, f"task {t!r} needs the data file {p}, which does not exist",
                             "point params `data.dir` at the offline data folder "
                             "(see its SOURCES.md), or drop the task")
        out[t] = p
    return out


def count_docs(path: str | Path) -> int:
    """Number of non-empty lines (= docs) of a jsonl file."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# -- task YAMLs ------------------------------------------------------------------------------------

def lm_eval_tasks_dir() -> Path:
    """``lm_eval/tasks`` of the installed lm-eval (found without importing it)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FlexiError("lm-eval", "the lm-eval package is not installed",
                         "install it: pip install -c constraints.txt 'lm-eval>=0.4.9'")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def builtin_yaml(task: str) -> Path:
    p = lm_eval_tasks_dir() / ALL_TASKS[task].builtin
    if not p.is_file():
        raise FlexiError("lm-eval", f"built-in task YAML {p} not found (lm-eval version changed?)",
                         "install the pinned lm-eval from constraints.txt")
    return p


def local_task_config(task: str, data_file: Path) -> dict[str, Any]:
    """The generated YAML: include the built-in task, rename it, override only the data source."""
    split = ALL_TASKS[task].split
    cfg: dict[str, Any] = {
        "include": str(builtin_yaml(task)),
        "task": local_name(task),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
    }
    cfg.update({k: None for k in SPLITS})
    cfg[f"{split}_split"] = split
    return cfg


def write_local_task_yamls(data_dir: str | Path, out_dir: str | Path,
                           tasks: Iterable[str] | None = None) -> dict[str, str]:
    """Write ``<out_dir>/<task>_local.yaml`` for each task (default: all); return {task: local name}.

    Use the folder with ``lm_eval.tasks.TaskManager(include_path=out_dir)``.
    """
    names = check_tasks(list(ALL_TASKS) if tasks is None else tasks)
    files = data_files(data_dir, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in names:
        text = yaml.safe_dump(local_task_config(t, files[t]), sort_keys=False)
        (out / f"{local_name(t)}.yaml").write_text(f"# generated by flexigpt.evaluate.lm_tasks: {t} on local data\n{text}")
    return {t: local_name(t) for t in names}


def task_manager(yaml_dir: str | Path):
    """A TaskManager over the generated YAMLs only (the built-ins are reached through ``include:``;
    indexing all of lm-eval's built-in task folders would cost seconds per call)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(yaml_dir), include_defaults=False)


# -- results ---------------------------------------------------------------------------------------

def to_jsonable(x: Any) -> Any:
    """Recursively turn lm-eval output into plain JSON (dtypes/functions -> str, NaN/inf -> None)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        try:
            return to_jsonable(x.item())
        except (TypeError, ValueError):
            pass
    return str(x)


VOLATILE_KEYS = frozenset({"date", "start_time", "end_time", "total_evaluation_time_seconds", "pretty_env_info",
                           "git_hash", "upper_git_hash", "transformers_version", "lm_eval_version"})
"""Top-level fields of lm-eval's output that change from run to run (clock, host, versions)."""
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def stable_results(raw: Any, replace: Mapping[str, str] | None = None) -> Any:
    """lm-eval output with the run-to-run noise taken out, so equal results give equal bytes.

    Drops :data:`VOLATILE_KEYS` at the top level (package versions are in the lineage instead),
    removes object addresses (``<HFLM object at 0x7f...>``) and replaces each ``replace`` key (the
    temporary task-YAML folder) by its value, anywhere in the tree.
    """
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, str):
            for old, new in (replace or {}).items():
                x = x.replace(old, new)
            return _ADDRESS.sub("", x)
        return x

    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k not in VOLATILE_KEYS}
    return clean(raw)


def _metric_key(key: str) -> str:
    """``acc,none`` -> ``acc``; ``m,filter`` -> ``m.filter``."""
    metric, _, filt = key.partition(",")
    return metric if filt == "none" else f"{metric}.{filt}"


def task_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per-task numeric metrics with lm-eval's ``,none`` suffixes stripped.

    Accepts :func:`run_zero_shot` output (``{"tasks": ...}``), lm-eval's raw output
    (``{"results": ...}``) or a per-task mapping; ``_local`` task names map back to the task.
    Non-numeric values (lm-eval's ``"N/A"`` stderr) and bookkeeping fields are dropped.
    """
    per_task = results.get("tasks", results.get("results", results))
    out: dict[str, dict[str, float]] = {}
    for name, metrics in per_task.items():
        if not isinstance(metrics, Mapping):
            continue
        task = name[: -len(LOCAL_SUFFIX)] if name.endswith(LOCAL_SUFFIX) else name
        clean: dict[str, float] = {}
        for k, v in metrics.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            key = _metric_key(k) if "," in k else k
            if numeric and key not in NON_METRICS:
                clean[key] = float(v)
        out[task] = clean
    return out


def headline(metrics: Mapping[str, float], task: str = "") -> float:
    """acc_norm where the task has it, else acc (the SliceGPT / FlexiGPT convention)."""
    if "acc_norm" in metrics:
        return float(metrics["acc_norm"])
    if "acc" in metrics:
        return float(metrics["acc"])
    raise FlexiError("evaluate.tasks", f"task {task!r} has neither acc_norm nor acc", "evaluate it with lm-eval")


def paper_average(results: Mapping[str, Any]) -> float:
    """mean over the 5 paper tasks (ARC-e, ARC-c, PIQA, WinoGrande, HellaSwag; no BoolQ) of headline()."""
    per = task_metrics(results)
    missing = [t for t in PAPER_TASKS if t not in per]
    if missing:
        raise FlexiError("evaluate.tasks", f"the paper average needs {missing}", f"evaluate all of {list(PAPER_TASKS)}")
    return sum(headline(per[t], t) for t in PAPER_TASKS) / len(PAPER_TASKS)


# -- running ---------------------------------------------------------------------------------------

def _samples(limits: dict[str, int | None], files: dict[str, Path]) -> dict[str, list[int]] | None:
    """lm-eval ``samples`` selecting the first ``limit`` docs of each limited task (all docs otherwise)."""
    out = {}
    for t, n in limits.items():
        if n is not None:
            total = count_docs(files[t])
            if n < total:
                out[local_name(t)] = list(range(n))
    return out or None


def run_zero_shot(model, tokenizer, tasks: str | Iterable[str], data_dir: str | Path, limit: Limit = None, *,
                  batch_size: int = 8, dtype: str = "bfloat16", yaml_dir: str | Path | None = None,
                  bootstrap_iters: int = 100_000) -> dict[str, Any]:
    """0-shot lm-eval on ``model`` (any causal ``PreTrainedModel``, hooks/LoRA included) over local data.

    ``limit``: first N docs of every task, None for all, or ``{task: N | None}``. With
    ``dtype="bfloat16"`` the forward runs under CPU bf16 autocast; log-softmax is always float32.
    Returns ``{"tasks": {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, ...}}, "n_docs",
    "limits", "dtype", "raw"}``; ``raw`` is lm-eval's JSON-serialisable results dict.
    """
    names = check_tasks(tasks)
    limits = check_limits(limit, names)
    files = data_files(data_dir, names)
    check_batch_size(batch_size)
    check_dtype(dtype, "evaluate.dtype")

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="flexigpt-tasks-") as tmp:
        ydir = Path(yaml_dir) if yaml_dir is not None else Path(tmp)
        local = write_local_task_yamls(data_dir, ydir, names)
        # lm-eval's _model_call enters its own torch.autocast(enabled=mixed_precision_dtype is not None),
        # which would switch an outer autocast off, so bf16 is requested through HFLM as well.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                  softmax_dtype=torch.float32,
                  mixed_precision_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
        try:
            with compute_context(dtype, model):
                raw = simple_evaluate(model=lm, tasks=[local[t] for t in names], num_fewshot=0,
                                      samples=_samples(limits, files), task_manager=task_manager(ydir),
                                      log_samples=True, bootstrap_iters=bootstrap_iters)
        finally:
            model.train(was_training)
    samples = per_doc(raw.pop("samples", None) or {}, {t: local[t] for t in names})  # kept out of the results file
    raw = stable_results(to_jsonable(raw), {str(ydir): "<task-yamls>"})
    n_docs = {t: int(raw.get("n-samples", {}).get(local[t], {}).get("effective", 0)) for t in names}
    return {"tasks": task_metrics(raw), "n_docs": n_docs, "limits": limits, "dtype": dtype, "raw": raw,
            "samples": samples}


PER_DOC_METRICS = ("acc", "acc_norm")


def per_doc(logged: Mapping[str, list[Mapping[str, Any]]], local: Mapping[str, str]) -> dict[str, dict[str, list]]:
    """Per-document correctness from lm-eval's ``log_samples``: ``{task: {doc_ids, docs_sha256, acc, acc_norm}}``.

    Why: paired statistics between models need each document's result, not the task mean; the
    ``docs_sha256`` digest of lm-eval's document hashes proves two models saw the same documents.
    """
    import hashlib

    out: dict[str, dict[str, list]] = {}
    for task, name in local.items():
        rows = sorted(logged.get(name, []), key=lambda r: int(r["doc_id"]))
        if not rows or not any(m in rows[0] for m in PER_DOC_METRICS):
            continue  # e.g. wikitext: perplexity tasks have no per-document correctness
        rec: dict[str, Any] = {"doc_ids": [int(r["doc_id"]) for r in rows],
                               "docs_sha256": hashlib.sha256("".join(str(r.get("doc_hash", "")) for r in rows)
                                                             .encode()).hexdigest()}
        for m in PER_DOC_METRICS:
            if m in rows[0]:
                rec[m] = [int(round(float(r[m]))) for r in rows]
        out[task] = rec
    return out


def save_results(results: Mapping[str, Any], path: str | Path) -> None:
    """Write :func:`run_zero_shot` output as JSON, atomically."""
    from flexigpt.fileio import write_json

    write_json(path, json.loads(json.dumps(to_jsonable(results))))
