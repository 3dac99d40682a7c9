"""Stage prune: importance scores + base model -> pruning plan (pruned blocks, bases, distances)."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import json

from flexigpt import plan as pl
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_dir, write_json
from flexigpt.model_import import load_plain
from flexigpt.plots import distance_heatmap, importance_bars
from flexigpt.stagekit import StageContext, log, stage_main


def num_blocks(ctx: StageContext) -> int:
    """Block count from the imported model's config.json (no weights loaded)."""
    cfg = ctx.path("base_model") / "config.json"
    if not cfg.is_file():
        raise FlexiError("paths.base_model", f"no imported model at {cfg.parent}",
                         "run the import_model stage first (`dvc repro import_model`)")
    return int(json.loads(cfg.read_text())["num_hidden_layers"])


def load_scores(ctx: StageContext, L: int) -> tuple[list[float] | None, str | None]:
    """Scores and method from importance.json, or (None, None) when it is absent."""
    path = ctx.path("importance") / "importance.json"
    if not path.is_file():
        return None, None
    d = json.loads(path.read_text())
    if len(d["scores"]) != L:
        raise FlexiError("paths.importance", f"{path} has {len(d['scores'])} scores but the model has {L} blocks",
                         "re-run score_importance for this model (`dvc repro score_importance`)")
    return [float(s) for s in d["scores"]], str(d["method"])


def body(ctx: StageContext) -> None:
    p = ctx.params
    ratio, blocks = p.get("prune.ratio"), p.get("prune.blocks", None)
    rank = pl.check_rank(p.get("prune.rank"))
    metric = p.str("prune.metric", choices=list(pl.METRICS))
    aggregate = p.str("prune.aggregate", choices=list(pl.AGGREGATES))
    svd = p.str("prune.svd", choices=list(pl.SVD_METHODS), default="gram")
    precision = p.str("prune.precision", choices=list(pl.PRECISIONS), default="float64")
    L = num_blocks(ctx)
    pl.choose_pruned([0.0] * L, ratio, blocks)  # validates ratio / blocks before anything heavy
    scores, method = load_scores(ctx, L)
    if scores is None and blocks is None:
        raise FlexiError("paths.importance", f"no importance scores at {ctx.path('importance')}/importance.json",
                         "run the score_importance stage first (`dvc repro score_importance`)")
    pruned = pl.choose_pruned(scores or [0.0] * L, ratio, blocks)
    log.info("pruning %d of %d blocks: %s (metric %s, rank %d, aggregate %s)", len(pruned), L, pruned,
             metric, rank, aggregate)
    model, _ = load_plain(ctx.path("base_model"), "float32")
    plan = pl.make_plan(model, scores, ratio=ratio, blocks=blocks, rank=rank, metric=metric,
                        aggregate=aggregate, svd=svd, importance_method=method, precision=precision)

    with atomic_dir(ctx.path("plan")) as tmp:
        plan.save(tmp / "plan.json")
        pl.write_distance_csvs(plan, tmp / "distances.csv", ctx.path("distance_plot"))
    distance_heatmap(plan.distances, plan.num_blocks, ctx.path("distance_png"), base=plan.base,
                     title=f"Base distance ({metric}, r={rank}, {aggregate})")
    if scores is not None:
        importance_bars(scores, ctx.path("pruned_png"), pruned=plan.pruned, method=method or "importance")

    chosen = [plan.distances[i][plan.base[i]] for i in plan.pruned]
    metrics = {"num_blocks": plan.num_blocks, "num_pruned": len(plan.pruned), "params_before": plan.params_before,
               "params_after": plan.params_after, "removed_param_fraction": round(plan.removed_param_fraction, 6),
               "mean_base_distance": sum(chosen) / len(chosen),
               "mean_base_offset": sum(abs(i - plan.base[i]) for i in plan.pruned) / len(plan.pruned)}
    write_json(ctx.path("prune_metrics"), {**metrics, "pruned": plan.pruned,
                                           "base": {str(i): j for i, j in plan.base.items()},
                                           "runtime": ctx.runtime()})
    ctx.run.log_metrics(metrics)
    for path in (ctx.path("plan") / "plan.json", ctx.path("distance_png"), ctx.path("pruned_png")):
        ctx.run.log_artifact(path)
    ctx.run.set_tags({"prune.pruned": plan.pruned, "prune.base": plan.base})
    log.info("bases: %s; removes %.1f%% of parameters", plan.base, 100 * plan.removed_param_fraction)


if __name__ == "__main__":
    stage_main("prune", body)
