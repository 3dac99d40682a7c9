"""Stage train_adapters: train a variant's adapters (+ norms); run it with `accelerate launch`.

    accelerate launch --config_file configs/accelerate_cpu_ddp.yaml stages/train_adapters.py --variant flexigpt

``flexigpt`` starts from the svd_init artifact (pruned-and-rebuilt or extended, per ``mode``);
``lora_baseline`` is ShortGPT+LoRA (prune mode) or base + rank-matched LoRA (extend mode).
The stage is named ``train_<variant>``, as in dvc.yaml.
"""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import argparse
import math
import os

from safetensors.torch import load_file
from transformers import AutoConfig

from flexigpt import compact
from flexigpt.devices import resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_file, write_json
from flexigpt.forward import mean_nll
from flexigpt.model_import import load_plain
from flexigpt.plan import Plan
from flexigpt.stagekit import StageContext, is_main_process, log, stage_main
from flexigpt.train import settings_from_params, train, validate
from flexigpt.variants import build_variant, mode, spec_for

TRAINABLE = ("flexigpt", "lora_baseline")


def split(ctx: StageContext, name: str):
    f = ctx.path("data") / f"{name}.safetensors"
    if not f.is_file():
        raise FlexiError("paths.data", f"no {name} split at {f}", "run `dvc repro prepare_calibration` first")
    return load_file(str(f))["input_ids"]


def load_model(ctx: StageContext, variant: str):
    """FlexiGPT starts from the svd_init artifact; the LoRA baseline is built from base (+ plan)."""
    base, tok = load_plain(ctx.path("base_model"))
    plan = Plan.load(ctx.path("plan")) if mode(ctx.params) == "prune" else None  # extension needs no plan
    if variant == "flexigpt":
        return compact.load(ctx.path("flexigpt_init")), base, tok
    return build_variant(base, variant, ctx.params, plan), base, tok


def body(ctx: StageContext, variant: str) -> None:
    p = ctx.params
    s = settings_from_params(p)
    if mode(p) == "extend" or variant == "lora_baseline":  # validate the variant's params before loading weights
        num_blocks = AutoConfig.from_pretrained(ctx.path("base_model")).num_hidden_layers
        plan = Plan.load(ctx.path("plan")) if mode(p) == "prune" else None
        spec_for("flexigpt" if mode(p) == "extend" else variant, p, plan, num_blocks)
    ids = split(ctx, "train")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(s, ids.shape[0], ids.shape[1], world)  # fail fast, before loading any weights
    model, base, tok = load_model(ctx, variant)
    teacher = base if s.kd_weight > 0 else None
    if teacher is None:
        del base
    curve = ctx.path("plots_dir") / f"train_{variant}.csv"
    curve.parent.mkdir(parents=True, exist_ok=True)

    def on_step(rec: dict) -> None:
        ctx.run.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    res = train(model, ids, s, teacher=teacher, ckpt_dir=ctx.path("checkpoints") / variant,
                resume=p.bool("train.resume", default=True), on_step=on_step)
    if not is_main_process():
        return
    cols = ("step", "loss", "lr", "grad_norm", "tokens_seen")  # no wall-clock column: the curve is a result
    rows = [",".join(cols)] + [",".join(repr(rec[k]) for k in cols) for rec in res.history]  # resumed steps too
    with atomic_file(curve) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    heldout = split(ctx, "heldout").long()
    ppl = math.exp(mean_nll(model, heldout, batch_size=s.micro_batch, dtype=resolve_dtype(s.dtype),
                            progress=True))
    out = ctx.path("trained") / variant
    compact.save(model, out, tokenizer=tok)
    result = res.to_dict()
    ctx.timing.update(train_s=round(result.pop("wall_s"), 2), tokens_per_s=round(result.pop("tokens_per_s"), 1))
    metrics = {**result, "heldout_ppl": ppl, "variant": variant, "mode": mode(p), "seed": s.seed,
               "trainable_params": sum(t.numel() for t in model.parameters() if t.requires_grad),
               "runtime": ctx.runtime(s.dtype)}
    write_json(ctx.path("metrics_dir") / f"train_{variant}.json", metrics)
    ctx.run.log_metrics({k: v for k, v in metrics.items() if k not in ("variant", "mode", "runtime")})
    ctx.run.log_artifact(curve)
    log.info("%s: final loss %.3f, heldout PPL %.2f, %.0f tok/s", variant, res.final_loss, ppl, res.tokens_per_s)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=TRAINABLE, required=True)
    a = ap.parse_args()
    stage_main(f"train_{a.variant}", lambda ctx: body(ctx, a.variant))
