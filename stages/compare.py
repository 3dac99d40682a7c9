"""Stage compare: per-variant metrics -> comparison table (md, csv), chart, MLflow parent summary."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
from flexigpt import variants
from flexigpt.evaluate.suite import EvaluateSettings
from flexigpt.fileio import atomic_file, write_json
from flexigpt.pipeline.stagekit import StageContext, log, stage_main
from flexigpt.report import tables


def body(ctx: StageContext) -> None:
    s, r = EvaluateSettings.from_params(ctx.params), variants.Recipe.from_params(ctx.params)
    results, training = tables.load_results(ctx.path("metrics_dir"), list(s.variants))
    df = tables.comparison_table(results, training=training)
    protocols = next(x for x in results.values() if x.get("applicable", True)).get("protocols", {})
    out = ctx.path("reports")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "comparison.csv") as tmp:
        df.to_csv(tmp, float_format="%.4f")
    with atomic_file(out / "comparison.md") as tmp:
        tmp.write_text(tables.to_markdown(df, protocols))
    long = df[[c for c in ("wikitext2_ppl_512", "heldout_ppl", "paper_avg") if c in df.columns]].reset_index()
    with atomic_file(ctx.path("plots_dir") / "comparison.csv") as tmp:
        long.to_csv(tmp, index=False, float_format="%.4f")
    png = ctx.path("plots_dir") / "comparison.png"
    tables.plot_comparison(df, str(png))
    summary = tables.summary(df)
    write_json(ctx.path("metrics_dir") / "comparison.json", {"mode": r.mode, **summary})
    for f in (out / "comparison.md", out / "comparison.csv", png):
        ctx.run.log_artifact(f)
    ctx.run.log_metrics(summary)
    linked = ctx.run.summarise_pipeline([out / "comparison.md", out / "comparison.csv", png])  # the parent run too
    if linked:
        log.info("cached stages linked to their producing runs: %s", ", ".join(linked))
    print(tables.to_markdown(df, protocols))


if __name__ == "__main__":
    stage_main("compare", body)
