"""Stage score_importance: base model + calibration split -> per-block importance (Eq. 1) + plots."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import csv
import time

from flexigpt.compress.importance import ImportanceSettings, score_model
from flexigpt.fileio import atomic_dir, atomic_file, write_json
from flexigpt.model.stream import GIB, StreamSettings
from flexigpt.pipeline.stagekit import StageContext, log, stage_main
from flexigpt.report.plots import importance_bars


def body(ctx: StageContext) -> None:
    s = ImportanceSettings.from_params(ctx.params)
    log.info("scoring blocks with %s on %s", s.method, ctx.device)
    t0 = time.time()
    res, memory = score_model(s, ctx.path("base_model"), ctx.path("data"), ctx.device, StreamSettings.from_params(ctx.params))
    wall = time.time() - t0
    with atomic_dir(ctx.path("importance")) as tmp:
        write_json(tmp / "importance.json", res.to_dict())
    with atomic_file(ctx.path("importance_plot")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "score"])
        w.writerows([i, repr(x)] for i, x in enumerate(res.scores))
    importance_bars(res.scores, ctx.path("importance_png"), method=s.method)
    metrics = {"tokens": res.tokens, "sequences": res.sequences, "num_blocks": res.num_blocks,
               "score_min": min(res.scores), "score_max": max(res.scores),
               "memory_estimate_gib": round(sum(memory.values()) / GIB, 4)}  # layer-wise peak, on paper
    ctx.timing.update(scoring_s=round(wall, 2), tokens_per_s=round(res.tokens / max(wall, 1e-9), 1))
    write_json(ctx.path("importance_metrics"), {"method": s.method, **metrics, "runtime": ctx.runtime(s.dtype)})
    ctx.run.log_metrics(metrics)
    for i, x in enumerate(res.scores):
        ctx.run.log_metrics({"importance_score": x}, step=i)
    ctx.run.log_artifact(ctx.path("importance") / "importance.json")
    ctx.run.log_artifact(ctx.path("importance_png"))
    ctx.run.set_tags({"importance.method": s.method, "importance.lowest": res.ranking()[:12]})
    log.info("lowest-scoring blocks: %s", res.ranking()[:12])


if __name__ == "__main__":
    stage_main("score_importance", body, outputs=("importance", "importance_metrics", "importance_plot", "importance_png"))
