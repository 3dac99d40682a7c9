"""Stage evaluate@<variant>: perplexity (3 labelled protocols), zero-shot lm-eval, cost accounting.

The variant's model comes from ``evaluate.variants[<variant>]``: a plain HF folder (dense), a plan
folder (ShortGPT: the plan's blocks removed from the base model), or a compact flexigpt folder.
"""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import argparse

from flexigpt import variants
from flexigpt.config import data_dir
from flexigpt.data.splits import load_split
from flexigpt.devices import place
from flexigpt.errors import FlexiError
from flexigpt.evaluate import cost, lm_tasks
from flexigpt.evaluate.suite import EvaluateSettings, evaluate_model
from flexigpt.fileio import sha256_file, write_json
from flexigpt.model.arch import facts_of
from flexigpt.model.importer import load_plain
from flexigpt.serve.speed import variant_speed
from flexigpt.pipeline.stagekit import StageContext, log, stage_main


def body(ctx: StageContext, variant: str) -> None:
    s, r = EvaluateSettings.from_params(ctx.params), variants.Recipe.from_params(ctx.params)
    if variant not in s.variants:
        raise FlexiError("variant", f"unknown variant {variant!r}", f"use one of {sorted(s.variants)} (evaluate.variants)")
    variants.get(variant)  # a registered variant: its name says how its folder is read
    files = s.data_files(data_dir(ctx.params))  # every input checked before any model loads
    out_file = ctx.path("metrics_dir") / "eval" / f"{variant}.json"
    samples_file = ctx.path("metrics_dir") / "eval" / "samples" / f"{variant}.json"
    if not variants.applicable(variant, r):
        log.info("%s does not exist in mode %s: recorded as not applicable", variant, r.mode)
        write_json(out_file, {"variant": variant, "mode": r.mode, "applicable": False})
        write_json(samples_file, {"variant": variant, "mode": r.mode, "applicable": False})
        write_json(ctx.path("eval") / variant / "not_applicable.json", {"variant": variant, "mode": r.mode})
        return
    variants.check_folder(variant, s.variants[variant])
    s.check_model(facts_of(ctx.path("base_model")).max_positions)
    heldout = load_split(ctx.path("data"), "heldout")
    model, tok = variants.load_variant(variant, s.variants[variant], ctx.path("base_model"), r)
    place(model, ctx.device)
    record, raw, samples = evaluate_model(model, tok, s, data_dir(ctx.params), heldout, ctx.device)
    out = {"variant": variant, "label": variants.label(variant, r), "mode": r.mode, "applicable": True, **record,
           "runtime": ctx.runtime(s.dtype)}
    batch = heldout[:1]
    ctx.timing.update(latency_s=cost.forward_latency(model, batch, repeats=3, dtype=record["dtype"])["median_s"],
                      latency_tokens=int(batch.numel()))  # wall-clock: run record only, never in results
    if s.speed and variant != "dense":  # ratios to dense, timed side by side in this process (run record only)
        dense, _ = load_plain(ctx.path("base_model"))
        place(dense, ctx.device)
        ctx.timing["speed"] = variant_speed(model, dense, heldout, dtype=record["dtype"])
        log.info("%s speed vs dense: %s", variant, ctx.timing["speed"])
    eval_dir = ctx.path("eval") / variant
    eval_dir.mkdir(parents=True, exist_ok=True)
    lm_tasks.save_results(raw, eval_dir / "lm_eval_results.json")
    write_json(samples_file, {"variant": variant, "mode": r.mode, "applicable": True, **samples})
    write_json(out_file, out)
    ctx.run.log_metrics({k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    ctx.run.log_metrics({"tasks": out["tasks"], "cost": out["cost"]})
    ctx.run.log_artifact(eval_dir / "lm_eval_results.json")
    ctx.run.set_tags({f"data.sha256.{f.parent.name}/{f.name}": sha256_file(f) for f in files.values()})
    log.info("%s: heldout PPL %.2f, paper average %s", variant, out["heldout_ppl"], out["paper_average"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True)
    a = ap.parse_args()
    stage_main(f"evaluate@{a.variant}", lambda ctx: body(ctx, a.variant))
