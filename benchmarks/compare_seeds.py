"""The same-budget comparison over 3 training seeds (issue 6): mean ± std per metric and variant.

    python benchmarks/compare_seeds.py --seeds 0 1 2 [--write benchmarks/results/compare_seeds.md]

Evaluates what `dvc repro` compares (dense, ShortGPT, ShortGPT+LoRA, FlexiGPT with the params.yaml
recipe and budget), with the pipeline's plan and data, once per training seed (batch order and random
adapter init; see harness.py). Untrained variants do not depend on the seed and are evaluated once.
Metrics: the evaluate stage's (heldout PPL, WikiText-2 token PPL, 5-task paper average) under the
harness's protocol (harness.PROTOCOL) and the validation-slice PPL of the training corpus. Cells are
cached under ``benchmarks/results/recipes`` (shared with recipe_study.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness import ROOT, emit, mean_std, params_for, protocol, run_cell

from flexigpt import variants

OUT = ROOT / "benchmarks" / "results" / "recipes"
EVALS = {"val", "suite", "latency"}
METRICS = (("heldout_ppl", "heldout PPL"), ("wikitext2_ppl_2048", "WikiText-2 PPL (2048)"),
           ("paper_avg", "5-task avg %"), ("val_ppl", "val PPL"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--write", type=Path, help="also write the table to this markdown file")
    a = ap.parse_args()
    p = params_for({})
    cells = {v: {s: run_cell(v, {}, s, EVALS, OUT) for s in (a.seeds if v in variants.trainable() else [0])}
             for v in variants.VARIANTS if variants.applicable(v, p)}  # untrained variants: seed-independent
    dense = cells["dense"][0]
    lines = ["| variant | n | " + " | ".join(m[1] for m in METRICS) + " | retained % | trainable | stored | latency |",
             "|---|---|" + "---|" * (len(METRICS) + 4)]
    for v, runs in cells.items():
        rs = list(runs.values())
        first = rs[0]
        lines.append(f"| {variants.label(v, p)} | {len(rs)} | " + " | ".join(mean_std([r[k] for r in rs]) for k, _ in METRICS)
                     + f" | {mean_std([100 * r['paper_avg'] / dense['paper_avg'] for r in rs])} | "
                     f"{first.get('trainable_params', 0) / 1e6:.2f}M | {first['cost']['stored_params'] / 1e6:.1f}M | "
                     f"{100 * first['latency_s'] / dense['latency_s']:.0f}% |")
    ev = protocol(p)
    lines.append(f"\n{p.int('train.token_budget'):,} training tokens per trained variant, training seeds {a.seeds} "
                 f"(mean ± std); untrained rows are seed-independent (n = 1). Tasks: {', '.join(ev.tasks)}, "
                 f"first {ev.limit} docs each (stderr ≈ 7 points per task). "
                 "Latency: forward of 1 heldout sequence vs dense.")
    emit(lines, a.write)


if __name__ == "__main__":
    main()
