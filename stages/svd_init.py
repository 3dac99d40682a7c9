"""Stage svd_init: base model (+ plan) -> FlexiGPT at init (compact) + start perplexities.

``mode: prune``: replaced blocks with svd_diff adapters; start PPL of dense / ShortGPT / FlexiGPT.
``mode: extend``: repeated blocks with zero-init adapters; start PPL of the base and the extended model.
"""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
from flexigpt.data.splits import load_split
from flexigpt.fileio import write_json
from flexigpt.pipeline.stagekit import StageContext, log, stage_main
from flexigpt.variants import Recipe, SvdInitSettings, init_flexigpt


def body(ctx: StageContext) -> None:
    r, s = Recipe.from_params(ctx.params), SvdInitSettings.from_params(ctx.params)
    heldout = load_split(ctx.path("data"), "heldout")
    metrics = init_flexigpt(r, s, ctx.path("base_model"), ctx.path("plan"), heldout, ctx.path("flexigpt_init"),
                            ctx.device)
    metrics["runtime"] = ctx.runtime(s.eval_dtype)
    write_json(ctx.path("svd_init_metrics"), metrics)
    ctx.run.log_metrics({k: v for k, v in metrics.items() if k not in ("mode", "runtime")})
    ctx.run.log_artifact(ctx.path("flexigpt_init") / "flexigpt.json")
    log.info("%s mode: depth %d -> %d, start PPL %s", r.mode, metrics["depth_before"], metrics["depth_after"],
             {k: round(metrics[k]["heldout_ppl"], 2) for k in ("dense", "shortgpt", "flexigpt") if k in metrics})


if __name__ == "__main__":
    stage_main("svd_init", body, outputs=("flexigpt_init", "svd_init_metrics"))
