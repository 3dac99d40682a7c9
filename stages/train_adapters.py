"""Stage train_<variant>: train a variant's adapters (+ norms), under `accelerate launch`.

    python stages/train_adapters.py --variant flexigpt      # relaunches itself with params train_launch.config
    accelerate launch --config_file configs/accelerate_cpu_ddp.yaml stages/train_adapters.py --variant flexigpt
"""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import argparse

from flexigpt import variants
from flexigpt.fileio import atomic_file, write_json
from flexigpt.pipeline.launch import relaunch
from flexigpt.pipeline.stagekit import StageContext, is_main_process, log, stage_main
from flexigpt.train import TrainSettings, train_variant


def body(ctx: StageContext, variant: str) -> None:
    s, r = TrainSettings.from_params(ctx.params), variants.Recipe.from_params(ctx.params)
    paths = {k: ctx.path(k) for k in ("base_model", "plan", "flexigpt_init", "data", "trained", "checkpoints")}

    def on_step(rec: dict) -> None:
        ctx.run.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    out = train_variant(variant, r, s, paths, device=ctx.device, on_step=on_step)
    if not is_main_process():
        return
    curve = ctx.path("plots_dir") / f"train_{variant}.csv"
    with atomic_file(curve) as tmp:
        tmp.write_text(out.curve_csv())
    ctx.timing.update(out.timing)
    metrics = {**out.metrics, "runtime": ctx.runtime(s.dtype)}
    write_json(ctx.path("metrics_dir") / f"train_{variant}.json", metrics)
    ctx.run.log_metrics({k: v for k, v in metrics.items() if k not in ("variant", "mode", "runtime")})
    ctx.run.log_artifact(curve)
    log.info("%s: final loss %.3f, heldout PPL %.2f", variant, metrics["final_loss"], metrics["heldout_ppl"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=variants.trainable(), required=True)
    a = ap.parse_args()
    relaunch()  # under accelerate launch (train_launch.config); exits with the child's status and message
    stage_main(f"train_{a.variant}", lambda ctx: body(ctx, a.variant), outputs=(f"trained/{a.variant}",))
