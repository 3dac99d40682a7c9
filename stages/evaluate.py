"""Stage evaluate@<variant>: perplexity (3 labelled protocols), zero-shot lm-eval, cost accounting.

The variant's model comes from ``evaluate.variants[<variant>]``: a plain HF folder (dense), a plan
folder (ShortGPT: the plan's blocks removed from the base model), or a compact flexigpt folder.
"""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import argparse
from pathlib import Path

from safetensors.torch import load_file

from flexigpt import compact, cost, lm_tasks, perplexity
from flexigpt.config import check_int, data_dir
from flexigpt.devices import resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.fileio import sha256_file, write_json
from flexigpt.model_import import load_plain
from flexigpt.plan import Plan
from flexigpt.stagekit import StageContext, log, stage_main
from flexigpt.variants import applicable, build_variant, label, mode


def load_variant(ctx: StageContext, variant: str, path: Path):
    """(model, tokenizer) for a variant folder: compact flexigpt, plan (ShortGPT) or plain HF."""
    base, tok = load_plain(ctx.path("base_model"))
    if (path / compact.MANIFEST).is_file():
        return compact.load(path), tok
    if (path / "plan.json").is_file():
        return build_variant(base, "shortgpt", ctx.params, Plan.load(path), copy_base=False), tok
    if (path / "config.json").is_file():
        return (base, tok) if path.resolve() == ctx.path("base_model").resolve() else load_plain(path)
    raise FlexiError(f"evaluate.variants.{variant}", f"{path} is not a model, plan or compact folder",
                     "point it at artifacts/base_model, artifacts/plan or a compact folder (artifacts/trained/...)")


def settings(ctx: StageContext, variant: str) -> dict:
    """Validate every evaluate.* param (and the data files) before any model loads."""
    p = ctx.params
    variants = p.section("evaluate.variants")
    if variant not in variants:
        raise FlexiError("variant", f"unknown variant {variant!r}", f"use one of {sorted(variants)} (evaluate.variants)")
    tasks = lm_tasks.check_tasks(p.get("evaluate.tasks"))
    limit = lm_tasks.check_limits(p.get("evaluate.limit"), tasks)
    ddir = data_dir(p)
    files = lm_tasks.data_files(ddir, tasks + (["wikitext"] if p.bool("evaluate.lm_eval_wikitext") else []))
    files["wikitext2_rows"] = perplexity.wikitext2_file(ddir)
    windows = p.get("evaluate.ppl_windows")
    if not isinstance(windows, list) or not windows:
        raise FlexiError("evaluate.ppl_windows", f"must be a list of window lengths, got {windows!r}", "write e.g. [2048, 512]")
    return {"path": Path(variants[variant]), "tasks": tasks, "limit": limit, "data_dir": ddir, "files": files,
            "windows": [check_int("evaluate.ppl_windows", w, min=2) for w in windows],
            "max_windows": p.int("evaluate.ppl_max_windows", min=1, allow_none=True),
            "wikitext_limit": p.int("evaluate.wikitext_docs", min=1, allow_none=True),
            "batch_size": p.int("evaluate.batch_size", min=1),
            "dtype": resolve_dtype(p.str("evaluate.dtype", choices=["auto", "bfloat16", "float32"]))}


def body(ctx: StageContext, variant: str) -> None:
    s = settings(ctx, variant)
    out_file = ctx.path("metrics_dir") / "eval" / f"{variant}.json"
    if not applicable(variant, ctx.params):
        log.info("%s does not exist in mode %s: recorded as not applicable", variant, mode(ctx.params))
        write_json(out_file, {"variant": variant, "mode": mode(ctx.params), "applicable": False})
        write_json(ctx.path("eval") / variant / "not_applicable.json", {"variant": variant, "mode": mode(ctx.params)})
        return
    model, tok = load_variant(ctx, variant, s["path"])
    out: dict = {"variant": variant, "label": label(variant, ctx.params), "mode": mode(ctx.params),
                 "applicable": True, "dtype": s["dtype"], "protocols": {}}
    heldout = load_file(str(ctx.path("data") / "heldout.safetensors"))["input_ids"].long()
    h = perplexity.heldout_ppl(model, heldout, batch_size=s["batch_size"], dtype=s["dtype"], progress=True)
    out["heldout_ppl"], out["protocols"]["heldout_ppl"] = h["ppl"], h["protocol"]
    for w in s["windows"]:
        r = perplexity.wikitext2_token_ppl(model, tok, s["data_dir"], w, batch_size=1, dtype=s["dtype"],
                                           max_windows=s["max_windows"], progress=True)
        out[f"wikitext2_ppl_{w}"], out["protocols"][f"wikitext2_ppl_{w}"] = r["ppl"], r["protocol"]
        log.info("%s: WikiText-2 PPL@%d = %.2f", variant, w, r["ppl"])
    tasks = s["tasks"] + (["wikitext"] if ctx.params.bool("evaluate.lm_eval_wikitext") else [])
    limit = {**s["limit"], **({"wikitext": s["wikitext_limit"]} if "wikitext" in tasks else {})}
    zs = lm_tasks.run_zero_shot(model, tok, tasks, s["data_dir"], limit, batch_size=s["batch_size"], dtype=s["dtype"])
    wt = zs["tasks"].pop("wikitext", None)
    if wt:
        out["lmeval_wikitext_word_ppl"] = wt.get("word_perplexity")
        out["protocols"]["lmeval_wikitext_word_ppl"] = (f"lm-eval wikitext (document level) word_perplexity, "
                                                        f"first {zs['n_docs'].get('wikitext')} documents")
    out["tasks"] = zs["tasks"]
    out["n_docs"] = zs["n_docs"]
    out["paper_average"] = lm_tasks.paper_average(zs) if set(lm_tasks.PAPER_TASKS) <= set(s["tasks"]) else None
    c = cost.count_cost(model)
    batch = heldout[:1]
    out["cost"] = c.to_dict()
    out["runtime"] = ctx.runtime(s["dtype"])
    ctx.timing.update(latency_s=cost.forward_latency(model, batch, repeats=3, dtype=s["dtype"])["median_s"],
                      latency_tokens=int(batch.numel()))  # wall-clock: run record only, never in results
    eval_dir = ctx.path("eval") / variant
    eval_dir.mkdir(parents=True, exist_ok=True)
    lm_tasks.save_results(zs["raw"], eval_dir / "lm_eval_results.json")
    write_json(out_file, out)
    ctx.run.log_metrics({k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    ctx.run.log_metrics({"tasks": out["tasks"], "cost": out["cost"]})
    ctx.run.log_artifact(eval_dir / "lm_eval_results.json")
    ctx.run.set_tags({f"data.sha256.{f.parent.name}/{f.name}": sha256_file(f) for f in s["files"].values()})
    log.info("%s: paper average %s", variant, out["paper_average"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True)
    a = ap.parse_args()
    stage_main(f"evaluate@{a.variant}", lambda ctx: body(ctx, a.variant))
