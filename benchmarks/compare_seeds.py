"""The same-budget comparison over 3 training seeds (issue 6): mean ± std per metric and variant.

    python benchmarks/compare_seeds.py --seeds 0 1 2 [--write benchmarks/results/compare_seeds.md]

Evaluates what `dvc repro` compares (dense, ShortGPT, ShortGPT+LoRA, FlexiGPT with the params.yaml
recipe and budget), with the pipeline's plan and data, once per training seed (batch order and random
adapter init; see harness.py). Untrained variants do not depend on the seed and are evaluated once.
Metrics: heldout PPL (WikiText-2, 16 x 512), WikiText-2 token PPL (first 4 windows of 2048), the
5-task paper average (first ``evaluate.limit`` docs per task) and the validation-slice PPL of the
training corpus. Cells are cached under ``benchmarks/results/recipes`` (shared with recipe_study.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness import ROOT, emit, mean_std, params_for, run_cell

OUT = ROOT / "benchmarks" / "results" / "recipes"
EVALS = {"val", "heldout", "wt2", "tasks", "cost"}
METRICS = (("heldout_ppl", "heldout PPL"), ("wikitext2_ppl_2048", "WikiText-2 PPL (2048)"),
           ("paper_avg", "5-task avg %"), ("val_ppl", "val PPL"))
LABELS = {"dense": "dense", "shortgpt": "ShortGPT", "lora_baseline": "ShortGPT+LoRA", "flexigpt": "FlexiGPT"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--write", type=Path, help="also write the table to this markdown file")
    a = ap.parse_args()
    cells = {v: {0: run_cell(v, {}, 0, EVALS, OUT)} for v in ("dense", "shortgpt")}
    for v in ("lora_baseline", "flexigpt"):
        cells[v] = {s: run_cell(v, {}, s, EVALS, OUT) for s in a.seeds}
    dense = cells["dense"][0]
    lines = ["| variant | n | " + " | ".join(m[1] for m in METRICS) + " | retained % | trainable | stored | latency |",
             "|---|---|" + "---|" * (len(METRICS) + 4)]
    for v, runs in cells.items():
        rs = list(runs.values())
        first = rs[0]
        lines.append(f"| {LABELS[v]} | {len(rs)} | " + " | ".join(mean_std([r[k] for r in rs]) for k, _ in METRICS)
                     + f" | {mean_std([100 * r['paper_avg'] / dense['paper_avg'] for r in rs])} | "
                     f"{first.get('trainable_params', 0) / 1e6:.2f}M | {first['stored_params'] / 1e6:.1f}M | "
                     f"{100 * first['latency_s'] / dense['latency_s']:.0f}% |")
    p = params_for({})
    lines.append(f"\n{p.int('train.token_budget'):,} training tokens per trained variant, training seeds {a.seeds} "
                 f"(mean ± std); untrained rows are seed-independent (n = 1). Tasks: arc_easy, arc_challenge, piqa, "
                 f"winogrande, hellaswag, first {p.get('evaluate.limit')} docs each (stderr ≈ 7 points per task). "
                 "Latency: forward of 1 x 512 tokens vs dense.")
    emit(lines, a.write)


if __name__ == "__main__":
    main()
