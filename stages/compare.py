"""Stage compare: per-variant metrics -> comparison table (md, csv), chart, MLflow parent summary."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import json

import pandas as pd

from flexigpt import report
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_file, write_json
from flexigpt.stagekit import StageContext, log, stage_main


def body(ctx: StageContext) -> None:
    results, training = {}, {}
    for v in ctx.params.section("evaluate.variants"):
        f = ctx.path("metrics_dir") / "eval" / f"{v}.json"
        if not f.is_file():
            raise FlexiError("evaluate.variants", f"no evaluation of {v!r} at {f}", f"run `dvc repro evaluate@{v}`")
        results[v] = json.loads(f.read_text())
        t = ctx.path("metrics_dir") / f"train_{v}.json"
        if t.is_file():
            training[v] = json.loads(t.read_text())
    df = report.comparison_table(results, training=training)
    variants = list(df.index)
    protocols = next(r for r in results.values() if r.get("applicable", True)).get("protocols", {})
    out = ctx.path("reports")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "comparison.csv") as tmp:
        df.to_csv(tmp, float_format="%.4f")
    with atomic_file(out / "comparison.md") as tmp:
        tmp.write_text(report.to_markdown(df, protocols))
    long = df[[c for c in ("wikitext2_ppl_512", "heldout_ppl", "paper_avg") if c in df.columns]].reset_index()
    with atomic_file(ctx.path("plots_dir") / "comparison.csv") as tmp:
        long.to_csv(tmp, index=False, float_format="%.4f")
    png = ctx.path("plots_dir") / "comparison.png"
    report.plot_comparison(df, str(png))
    summary = {v: {k: (float(df.loc[v, k]) if k in df.columns and pd.notna(df.loc[v, k]) else None) for k in
                   ("heldout_ppl", "wikitext2_ppl_512", "paper_avg", "retained_pct",
                    "stored_pct_of_dense")} for v in variants}

    write_json(ctx.path("metrics_dir") / "comparison.json", {"mode": ctx.params.str("mode", default="prune"), **summary})
    for f in ("comparison.md", "comparison.csv"):
        ctx.run.log_artifact(out / f)
    ctx.run.log_artifact(png)
    ctx.run.log_metrics(summary)
    linked = ctx.run.summarise_pipeline([out / "comparison.md", out / "comparison.csv", png])  # the parent run too
    if linked:
        log.info("cached stages linked to their producing runs: %s", ", ".join(linked))
    print(report.to_markdown(df, protocols))


if __name__ == "__main__":
    stage_main("compare", body)
