"""Stage prune: importance scores + base model -> pruning plan (pruned blocks, bases, distances)."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
from flexigpt.compress.plan import PruneSettings, plan_model, write_distance_csvs
from flexigpt.fileio import atomic_dir, write_json
from flexigpt.model.stream import StreamSettings
from flexigpt.pipeline.stagekit import StageContext, log, stage_main
from flexigpt.report.plots import distance_heatmap, importance_bars


def body(ctx: StageContext) -> None:
    s = PruneSettings.from_params(ctx.params)
    plan = plan_model(s, ctx.path("base_model"), ctx.path("importance"), StreamSettings.from_params(ctx.params))
    with atomic_dir(ctx.path("plan")) as tmp:
        plan.save(tmp / "plan.json")
        write_distance_csvs(plan, tmp / "distances.csv", ctx.path("distance_plot"))
    distance_heatmap(plan.distances, plan.num_blocks, ctx.path("distance_png"), base=plan.base,
                     title=f"Base distance ({s.metric}, r={s.rank}, {s.aggregate})")
    if plan.scores is not None and plan.importance_method is not None:
        importance_bars(plan.scores, ctx.path("pruned_png"), pruned=plan.pruned, method=plan.importance_method)
    metrics = plan.summary()
    write_json(ctx.path("prune_metrics"), {**metrics, "pruned": plan.pruned,
                                           "base": {str(i): j for i, j in plan.base.items()},
                                           "runtime": ctx.runtime()})
    ctx.run.log_metrics(metrics)
    for path in (ctx.path("plan") / "plan.json", ctx.path("distance_png"), ctx.path("pruned_png")):
        ctx.run.log_artifact(path)
    ctx.run.set_tags({"prune.pruned": plan.pruned, "prune.base": plan.base})
    log.info("pruned %s, bases %s; removes %.1f%% of parameters", plan.pruned, plan.base,
             100 * plan.removed_param_fraction)


if __name__ == "__main__":
    stage_main("prune", body, outputs=("plan", "prune_metrics", "distance_plot", "distance_png", "pruned_png"))
