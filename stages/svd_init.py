"""Stage svd_init: base model (+ plan) -> FlexiGPT at init (compact) + start perplexities.

``mode: prune``: replaced blocks with svd_diff adapters; start PPL of dense / ShortGPT / FlexiGPT.
``mode: extend``: repeated blocks with zero-init adapters; start PPL of the base and the extended
model (equal up to the small γ), the new depth and the parameter overhead.
"""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import math

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from flexigpt import compact
from flexigpt import flexi_model as fm
from flexigpt import variants
from flexigpt.devices import resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.fileio import write_json
from flexigpt.forward import mean_nll
from flexigpt.model_import import load_plain
from flexigpt.plan import Plan
from flexigpt.stagekit import StageContext, log, stage_main


def heldout_ids(ctx: StageContext) -> torch.Tensor:
    f = ctx.path("data") / "heldout.safetensors"
    if not f.is_file():
        raise FlexiError("paths.data", f"no heldout split at {f}", "run `dvc repro prepare_calibration` first")
    return load_file(str(f))["input_ids"].long()


def body(ctx: StageContext) -> None:
    p = ctx.params
    mode = variants.mode(p)
    plan = Plan.load(ctx.path("plan")) if mode == "prune" else None  # extension needs no pruning plan
    num_blocks = AutoConfig.from_pretrained(ctx.path("base_model")).num_hidden_layers
    spec = variants.flexigpt_spec(p, plan, num_blocks)  # validates adapters/norm/extend params before loading weights
    bs = p.int("svd_init.batch_size", min=1)
    dtype = resolve_dtype(p.str("svd_init.eval_dtype", choices=["auto", "bfloat16", "float32"]))
    ids = heldout_ids(ctx)
    base, tok = load_plain(ctx.path("base_model"))
    fm.validate_spec(fm.get_adapter(base), spec)
    metrics: dict = {"mode": mode, "depth_before": num_blocks, "depth_after": len(spec.sources)}
    for variant in ("dense", "shortgpt", "flexigpt"):
        if not variants.applicable(variant, p):
            continue
        model = variants.build_variant(base, variant, p, plan)
        nll = mean_nll(model, ids, batch_size=bs, dtype=dtype, progress=True)
        metrics[variant] = {"heldout_ppl": math.exp(nll), "stored_params": fm.unique_params(model),
                            "adapter_params": fm.adapter_params(model)}
        log.info("%s: heldout PPL %.2f, %d stored params", variant, math.exp(nll), metrics[variant]["stored_params"])
        if variant == "flexigpt":
            sizes = compact.save(model, ctx.path("flexigpt_init"), tokenizer=tok)
        del model
    dense_bytes = compact.dir_bytes(ctx.path("base_model"))
    metrics["disk"] = {"dense_bytes": dense_bytes, "compact_bytes": sizes["base_bytes"] + sizes["adapter_bytes"],
                       **sizes}
    metrics["disk"]["compact_vs_dense"] = metrics["disk"]["compact_bytes"] / dense_bytes
    ref = "shortgpt" if mode == "prune" else "dense"
    metrics[f"start_ppl_vs_{ref}"] = metrics["flexigpt"]["heldout_ppl"] / metrics[ref]["heldout_ppl"]
    metrics["param_overhead_vs_dense"] = metrics["flexigpt"]["stored_params"] / metrics["dense"]["stored_params"] - 1
    metrics["heldout_tokens"] = int(ids.numel())
    metrics["runtime"] = ctx.runtime(dtype)
    log.info("%s mode: depth %d -> %d, stored params %+.1f%% vs dense", mode, num_blocks, len(spec.sources),
             100 * metrics["param_overhead_vs_dense"])
    write_json(ctx.path("svd_init_metrics"), metrics)
    ctx.run.log_metrics({k: v for k, v in metrics.items() if k not in ("mode", "runtime")})
    ctx.run.log_artifact(ctx.path("flexigpt_init") / "flexigpt.json")


if __name__ == "__main__":
    stage_main("svd_init", body)
