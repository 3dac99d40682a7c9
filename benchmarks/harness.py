"""Train-and-evaluate cells for the seed/recipe/extension benchmarks, outside DVC, resumable.

A *cell* is (variant, param overrides, training seed). It builds the variant from the pipeline's
artifacts (``paths.base_model``, ``paths.plan``, ``paths.data``) as the stages do
(:func:`flexigpt.variants.build_variant`), trains it with the pipeline's trainer and measures ``evals``:

* ``val``: PPL on the first ``VAL_SEQS`` sequences of the *calibration* split: text from the
  training corpus, document-disjoint from the train split, neither WikiText-2 nor a task. Recipe
  choices are made on this number only. The pipeline has no such measurement.
* ``suite``: what the evaluate stage measures, by the same function
  (:func:`flexigpt.evaluate.suite.evaluate_model`) with params ``evaluate.*`` plus the ``PROTOCOL``
  overrides below: heldout PPL, WikiText-2 token PPL, lm-eval zero-shot tasks, the paper average
  (also as ``paper_avg``, in %) and the cost accounting.
* ``latency``: median forward time on 1 heldout sequence (wall-clock: in the cell's json, never in its key).

The seed is the *training* seed: it replaces params ``seed`` (batch order and random adapter init),
while the plan and the data splits stay those of the pipeline, so seeds measure training noise, not
plan changes. Each finished cell is written to ``<out>/<key>.json`` (metrics) and
``<key>.safetensors`` (its trained tensors only); a rerun skips finished cells and evaluates a
cached cell again only for the evals it lacks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from common import PARAMS, ROOT, base_model, data_folder, plan, split

from flexigpt import variants
from flexigpt.compress.plan import Plan
from flexigpt.config import Params
from flexigpt.devices import ComputeSettings, apply_threads, place, resolve_device, resolve_dtype, resolve_threads
from flexigpt.evaluate import cost, lm_tasks, perplexity
from flexigpt.evaluate.suite import EvaluateSettings, evaluate_model
from flexigpt.fileio import write_json
from flexigpt.train import TrainSettings, train

# The benchmark protocol: params evaluate.* with these overrides (limit, batch_size, dtype as in params.yaml).
PROTOCOL = {
    "evaluate.tasks": list(lm_tasks.PAPER_TASKS),  # the paper average's 5 tasks (no BoolQ)
    "evaluate.ppl_windows": [2048],
    "evaluate.ppl_max_windows": 4,                 # a quick WikiText-2 number: the first 4 x 2048 tokens
    "evaluate.lm_eval_wikitext": False,
}
VAL_SEQS = 32
EVALS = ("val", "suite", "latency")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def params_for(overrides: dict[str, Any]) -> Params:
    return PARAMS.with_overrides(overrides)


def protocol(p: Params) -> EvaluateSettings:
    """A cell's evaluation settings: params ``evaluate.*`` with ``PROTOCOL`` on top."""
    return EvaluateSettings.from_params(p.with_overrides(PROTOCOL))


def depends_on(variant: str) -> list[str]:
    """The params a variant's cell depends on, as dvc.yaml lists them: the evaluate stage's and, if it
    trains, its train_<variant> stage's (plus svd_init's when training starts from svd_init's output).
    ``evaluate`` is left out (the cell's own protocol is hashed instead), and so are ``paths.*`` (outputs)."""
    v = variants.get(variant)
    stages = [STAGES["evaluate"]["do"]]
    if v.trainable:
        stages.append(STAGES[f"train_{variant}"])
        if v.train_from == "init":
            stages.append(STAGES["svd_init"])
    keys = {k for stage in stages for k in stage["params"]}
    return sorted(k for k in keys if k != "evaluate" and not k.startswith("paths."))


def cell_key(variant: str, p: Params, the_plan: Plan) -> str:
    """Name of a cell: variant, seed and a hash of the *effective* values (after overrides) of the
    params it depends on, of its protocol and of the plan, so one recipe reached through different
    overrides or defaults shares one cache entry, and a baseline is not retrained when only
    FlexiGPT's params change."""
    eff = {k: p.get(k, None) for k in depends_on(variant)}
    if eff.get("mode") != "extend":
        eff.pop("extend", None)  # extend.* is read only when extending
    eff["protocol"] = {**{k: v for k, v in protocol(p).to_dict().items() if k != "variants"}, "val_seqs": VAL_SEQS}
    plan_dict = the_plan.to_dict()
    decision = {k: plan_dict[k] for k in ("pruned", "base", "layer_map")}  # not the float distances
    eff["plan"] = hashlib.sha256(json.dumps(decision, sort_keys=True).encode()).hexdigest()
    blob = json.dumps({"variant": variant, "params": eff}, sort_keys=True)
    return f"{variant}-s{eff.get('seed', 0)}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def evaluate(model, tok, p: Params, evals: set[str], device: str) -> dict[str, Any]:
    s = protocol(p)
    dtype = resolve_dtype(s.dtype, device)
    out: dict[str, Any] = {}
    model.eval()
    if "val" in evals:  # the heldout PPL's maths on the training corpus's validation slice
        out["val_ppl"] = perplexity.heldout_ppl(model, split("calibration", VAL_SEQS), batch_size=s.batch_size,
                                                dtype=dtype)["ppl"]
    if "suite" in evals:
        record, _ = evaluate_model(model, tok, s, data_folder(p), split("heldout"), device)
        out.update(record, paper_avg=100 * record["paper_average"])  # the tables print the average in %
    if "latency" in evals:
        out["latency_s"] = cost.forward_latency(model, split("heldout", 1), repeats=3, dtype=dtype)["median_s"]
    return out


def run_cell(variant: str, overrides: dict[str, Any], seed: int, evals: set[str], out_dir: Path,
             cache: dict | None = None) -> dict[str, Any]:
    """Train (if the variant trains) and evaluate one cell; finished work is reused from ``out_dir``."""
    assert evals <= set(EVALS), f"unknown evals {sorted(evals - set(EVALS))}; use some of {EVALS}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if "seed" not in depends_on(variant):
        seed = 0  # nothing in it is random or trained: one cell serves every seed
    p = params_for({**overrides, "seed": seed})
    cache = cache if cache is not None else {}
    if "plan" not in cache:
        cache["plan"] = plan()
    key = cell_key(variant, p, cache["plan"])
    f_json, f_st = out_dir / f"{key}.json", out_dir / f"{key}.safetensors"
    done = json.loads(f_json.read_text()) if f_json.is_file() else None
    if done and evals <= set(done.get("evals", [])):
        return done
    c = ComputeSettings.from_params(p)
    apply_threads(resolve_threads(c.threads))  # as the stages do: results depend on the thread count
    device = str(resolve_device(c.device))
    if "base" not in cache:
        cache["base"], cache["tok"] = base_model()
    model = place(variants.build_variant(cache["base"], variant, p, cache["plan"]), device)
    rec: dict[str, Any] = done or {"variant": variant, "overrides": overrides, "seed": seed, "key": key}
    if variants.get(variant).trainable:
        if f_st.is_file():
            _, unexpected = model.load_state_dict(load_file(str(f_st)), strict=False)
            assert not unexpected, unexpected
        else:
            s = dataclasses.replace(TrainSettings.from_params(p), seed=seed, checkpoint_every=0)
            teacher = cache["base"] if s.kd_weight > 0 else None
            t = time.time()
            res = train(model, split("train"), s, teacher=teacher, resume=False, device=device)
            rec.update(train=res.to_dict(), train_wall_s=time.time() - t,
                       trainable_params=sum(q.numel() for q in model.parameters() if q.requires_grad),
                       loss_curve=[h["loss"] for h in res.history])
            save_file(_trained_tensors(model), str(f_st))
    t = time.time()
    rec.update(evaluate(model, cache["tok"], p, evals - set(rec.get("evals", [])), device))
    rec["evals"] = sorted(set(rec.get("evals", [])) | evals)
    rec.setdefault("cost", cost.count_cost(model).to_dict())  # parameter counts, also for cells without the suite
    write_json(f_json, rec)
    print(f"[{time.strftime('%H:%M:%S')}] {key}: " + ", ".join(
        f"{k}={v:.2f}" for k, v in rec.items() if k.endswith("_ppl") or k == "paper_avg")
        + f" (eval {time.time() - t:.0f} s)", flush=True)
    return rec


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return ""
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def emit(lines: list[str], write: Path | None) -> None:
    """Print a markdown table (and write it to ``write`` when given)."""
    table = "\n".join(lines)
    print(table)
    if write:
        write.write_text(table + "\n")
