"""Train-and-evaluate cells for the seed/recipe/extension benchmarks, outside DVC, resumable.

A *cell* is (variant, param overrides, training seed). It builds the variant from the pipeline's
artifacts (``artifacts/base_model``, ``artifacts/plan``, ``artifacts/data``) exactly as the stages
do (:mod:`flexigpt.variants`), trains it with the pipeline's trainer, and evaluates it:

* ``val``: PPL on the first ``VAL_SEQS`` sequences of the *calibration* split: text from the
  training corpus, document-disjoint from the train split, neither WikiText-2 nor a task. Recipe
  choices are made on this number only.
* ``heldout``: the pipeline's heldout PPL (WikiText-2 test, 16 x 512 pre-tokenised windows).
* ``wt2``: WikiText-2 token PPL, rows joined by "\\n\\n", the first 4 windows of 2048 tokens.
* ``tasks``: lm-eval zero-shot on the paper's 5 tasks, first ``evaluate.limit`` docs each.
* ``cost``: stored / trainable parameters, block executions, forward latency on 1 x 512 tokens.

The seed is the *training* seed (batch order and random adapter init); the plan and the data
splits stay those of the pipeline, so seeds measure training noise, not plan changes. Each
finished cell is written to ``<out>/<key>.json`` (metrics) and ``<key>.safetensors`` (its trained
tensors only); a rerun skips finished cells and re-evaluates a cached cell if new evals are asked.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common import ROOT, base_model, plan, split

from flexigpt import cost, lm_tasks, perplexity
from flexigpt import flexi_model as fm
from flexigpt.config import Params, data_dir
from flexigpt.devices import resolve_dtype
from flexigpt.fileio import write_json
from flexigpt.train import settings_from_params, train
from flexigpt.variants import build_variant

VAL_SEQS = 32
TRAINED = ("lora_baseline", "flexigpt")


RELEVANT = {  # the params each variant's result depends on (besides mode, evaluate.* and the plan)
    "dense": (), "shortgpt": (),
    "lora_baseline": ("train", "adapters.rank", "adapters.alpha", "adapters.targets", "extend"),
    "flexigpt": ("train", "adapters", "norm", "extend"),
}


def cell_key(variant: str, p: Params, seed: int) -> str:
    """Name of a cell: variant, seed and a hash of the *effective* params it depends on (after
    overrides) and of the plan, so one recipe reached through different overrides or defaults
    shares one cache entry, and a baseline is not retrained when only FlexiGPT's params change."""
    eff = {k: p.get(k, None) for k in ("mode", *RELEVANT[variant])}
    if variant == "lora_baseline" and isinstance(eff.get("train"), dict):  # no output norms to train
        eff["train"] = {k: v for k, v in eff["train"].items() if k not in ("norm_lr_mult", "train_prenorms")}
    eff["evaluate"] = {k: v for k, v in p.section("evaluate").items() if k != "variants"}
    if eff["mode"] != "extend":
        eff.pop("extend", None)
    if variant in ("dense",):
        seed = 0  # nothing random
    plan = json.loads((ROOT / "artifacts" / "plan" / "plan.json").read_text())
    decision = {k: plan[k] for k in ("pruned", "base", "layer_map")}  # not the float distances
    plan_sha = hashlib.sha256(json.dumps(decision, sort_keys=True).encode()).hexdigest()
    blob = json.dumps({"variant": variant, "params": eff, "seed": seed, "plan": plan_sha}, sort_keys=True)
    return f"{variant}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def params_for(overrides: dict[str, Any]) -> Params:
    return Params.load(ROOT / "params.yaml").with_overrides(overrides)


def _trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def build(variant: str, p: Params, seed: int, base, the_plan) -> torch.nn.Module:
    torch.manual_seed(seed)  # random adapter inits (zeros-init LoRA A) depend on it
    return build_variant(base, variant, p, the_plan)


def evaluate(model, tok, p: Params, evals: set[str], dtype: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model.eval()
    if "val" in evals:
        out["val_ppl"] = perplexity.heldout_ppl(model, split("calibration")[:VAL_SEQS], batch_size=4, dtype=dtype)["ppl"]
    if "heldout" in evals:
        out["heldout_ppl"] = perplexity.heldout_ppl(model, split("heldout"), batch_size=4, dtype=dtype)["ppl"]
    if "wt2" in evals:
        out["wikitext2_ppl_2048"] = perplexity.wikitext2_token_ppl(model, tok, data_dir(p), 2048, batch_size=1,
                                                                   dtype=dtype, max_windows=4)["ppl"]
    if "tasks" in evals:
        tasks = list(lm_tasks.PAPER_TASKS)
        zs = lm_tasks.run_zero_shot(model, tok, tasks, data_dir(p), p.get("evaluate.limit"), batch_size=8,
                                    dtype=dtype, bootstrap_iters=1000)
        out["tasks"] = {t: 100 * lm_tasks.headline(zs["tasks"][t], t) for t in tasks}
        out["paper_avg"] = 100 * lm_tasks.paper_average(zs)
    if "cost" in evals:
        c = cost.count_cost(model)
        out.update(stored_params=c.stored_params, block_executions=c.block_executions,
                   latency_s=cost.forward_latency(model, split("heldout")[:1], repeats=3, dtype=dtype)["median_s"])
    return out


def run_cell(variant: str, overrides: dict[str, Any], seed: int, evals: set[str], out_dir: Path,
             cache: dict | None = None) -> dict[str, Any]:
    """Train (if needed) and evaluate one cell; cached results are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    p = params_for(overrides)
    key = cell_key(variant, p, seed)
    f_json, f_st = out_dir / f"{key}.json", out_dir / f"{key}.safetensors"
    done = json.loads(f_json.read_text()) if f_json.is_file() else None
    if done and evals <= set(done.get("evals", [])):
        return done
    dtype = resolve_dtype(p.str("evaluate.dtype"))
    cache = cache if cache is not None else {}
    if "base" not in cache:
        cache["base"], cache["tok"] = base_model()
        cache["plan"] = plan()
    model = build(variant, p, seed, cache["base"], cache["plan"])
    rec: dict[str, Any] = done or {"variant": variant, "overrides": overrides, "seed": seed, "key": key}
    if variant in TRAINED:
        if f_st.is_file():
            missing, unexpected = model.load_state_dict(load_file(str(f_st)), strict=False)
            assert not unexpected, unexpected
        else:
            s = settings_from_params(p)
            s.seed, s.checkpoint_every = seed, 0
            teacher = cache["base"] if s.kd_weight > 0 else None
            t = time.time()
            res = train(model, split("train"), s, teacher=teacher, resume=False)
            rec.update(train=res.to_dict(), train_wall_s=time.time() - t,
                       trainable_params=sum(q.numel() for q in model.parameters() if q.requires_grad),
                       loss_curve=[h["loss"] for h in res.history])
            save_file(_trained_tensors(model), str(f_st))
    t = time.time()
    rec.update(evaluate(model, cache["tok"], p, evals - set(rec.get("evals", [])), dtype))
    rec["evals"] = sorted(set(rec.get("evals", [])) | evals)
    rec.setdefault("adapter_params", fm.adapter_params(model))
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
