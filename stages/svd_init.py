"""Stage svd_init: base model + plan -> FlexiGPT at init (compact) + start-PPL of dense/ShortGPT/FlexiGPT."""
import math

import torch
from safetensors.torch import load_file

from flexigpt import compact
from flexigpt import flexi_model as fm
from flexigpt.devices import resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.fileio import write_json
from flexigpt.importance import mean_nll
from flexigpt.model_import import load_plain
from flexigpt.plan import Plan
from flexigpt.stagekit import StageContext, log, stage_main
from flexigpt.variants import build_variant, flexigpt_spec


def heldout_ids(ctx: StageContext) -> torch.Tensor:
    f = ctx.path("data") / "heldout.safetensors"
    if not f.is_file():
        raise FlexiError("paths.data", f"no heldout split at {f}", "run `dvc repro prepare_calibration` first")
    return load_file(str(f))["input_ids"].long()


def body(ctx: StageContext) -> None:
    p = ctx.params
    plan_file = ctx.path("plan") / "plan.json" if ctx.path("plan").is_dir() else ctx.path("plan")
    if not plan_file.is_file():
        raise FlexiError("paths.plan", f"no plan at {plan_file}", "run `dvc repro prune` first")
    plan = Plan.from_dict(__import__("json").loads(plan_file.read_text()))
    spec = flexigpt_spec(p, plan)  # validates adapters.* and norm.* before loading weights
    bs = p.int("svd_init.batch_size", min=1)
    dtype = resolve_dtype(p.str("svd_init.eval_dtype", choices=["auto", "bfloat16", "float32"]))
    ids = heldout_ids(ctx)
    base, tok = load_plain(ctx.path("base_model"))
    fm.validate_spec(fm.get_adapter(base), spec)
    metrics: dict = {}
    for variant in ("dense", "shortgpt", "flexigpt"):
        model = build_variant(base, variant, p, plan)
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
    metrics["start_ppl_vs_shortgpt"] = metrics["flexigpt"]["heldout_ppl"] / metrics["shortgpt"]["heldout_ppl"]
    metrics["heldout_tokens"] = int(ids.numel())
    write_json(ctx.path("svd_init_metrics"), metrics)
    ctx.run.log_metrics(metrics)
    ctx.run.log_artifact(ctx.path("flexigpt_init") / "flexigpt.json")


if __name__ == "__main__":
    stage_main("svd_init", body)
