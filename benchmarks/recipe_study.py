"""Recovery-recipe study (issue 8): FlexiGPT recipes vs ShortGPT+LoRA at equal training tokens.

    python benchmarks/recipe_study.py select            # 1 seed, default budget, validation PPL only
    python benchmarks/recipe_study.py report --recipe kept_glr10 --seeds 0 1 2 --budgets 1 4

``select`` trains every candidate recipe (and the baseline) once and ranks them by PPL on a
validation slice of the *training corpus* (the calibration split: neither WikiText-2 nor the
tasks). ``report`` then evaluates the chosen recipe, the paper reading and the baseline once on
WikiText-2 and the 5 tasks, for each seed and budget multiple (x the default ``train.token_budget``),
and prints mean ± std plus the paired per-seed difference against ShortGPT+LoRA. Finished cells are
cached under ``benchmarks/results/recipes`` (see harness.py), so the commands resume.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness import ROOT, VAL_SEQS, emit, mean_std, params_for, protocol, run_cell

OUT = ROOT / "benchmarks" / "results" / "recipes"
# Each recipe is a set of params overrides on top of params.yaml; "paper" is the paper's reading:
# adapters + output-norm γ on the replaced blocks only, γ at the adapters' learning rate.
PAPER = {"adapters.lora_on_kept": False, "train.norm_lr_mult": 1.0, "train.kd_weight": 0.0, "norm.gamma_init": 0.001}
RECIPES: dict[str, dict] = {
    "paper": PAPER,
    "glr10": {**PAPER, "train.norm_lr_mult": 10.0},
    "kept": {**PAPER, "adapters.lora_on_kept": True},
    "kept_glr10": {**PAPER, "adapters.lora_on_kept": True, "train.norm_lr_mult": 10.0},
    "kept_glr30": {**PAPER, "adapters.lora_on_kept": True, "train.norm_lr_mult": 30.0},
    "kept_kd": {**PAPER, "adapters.lora_on_kept": True, "train.kd_weight": 1.0},
}
BASELINE = {"train.kd_weight": 0.0}
# ShortGPT+LoRA with as many trainable parameters as the kept_* recipes (LoRA on all 30 positions at
# rank 32 = 9.78M): rank 46 on the 21 kept blocks = 9.83M.
BASELINE_MATCHED = {**BASELINE, "adapters.rank": 46}


def budget_overrides(mult: float) -> dict:
    base = params_for({}).int("train.token_budget", min=1)
    return {} if mult == 1 else {"train.token_budget": int(base * mult)}


def select(names: list[str], seed: int) -> None:
    rows = [("ShortGPT+LoRA", run_cell("lora_baseline", BASELINE, seed, {"val"}, OUT)),
            ("ShortGPT+LoRA r46 (params of kept_*)", run_cell("lora_baseline", BASELINE_MATCHED, seed, {"val"}, OUT))]
    rows += [(n, run_cell("flexigpt", RECIPES[n], seed, {"val"}, OUT)) for n in names]
    print(f"\nRecipe selection: seed {seed}, default budget, PPL on {OUT.name} validation slice "
          f"(calibration split, first {VAL_SEQS} sequences)\n")
    print("| recipe | val PPL | trainable params | stored params | train s |\n|---|---|---|---|---|")
    for n, r in sorted(rows, key=lambda x: x[1]["val_ppl"]):
        print(f"| {n} | {r['val_ppl']:.2f} | {r.get('trainable_params', 0) / 1e6:.2f}M | "
              f"{r['cost']['stored_params'] / 1e6:.1f}M | {r.get('train_wall_s', 0):.0f} |")


def report(recipes: list[str], seeds: list[int], budgets: list[float], matched: bool = False) -> str:
    evals = {"val", "suite", "latency"}
    lines = ["| budget | model | trainable | WikiText-2 PPL (2048) | ΔPPL vs SG+LoRA (paired) | 5-task avg | "
             "Δavg (paired) | val PPL | heldout PPL | stored | latency |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = run_cell("dense", {}, 0, evals, OUT)
    for mult in budgets:
        b = budget_overrides(mult)
        tokens = params_for(b).int("train.token_budget")
        base = {s: run_cell("lora_baseline", {**BASELINE, **b}, s, evals, OUT) for s in seeds}
        models = [("ShortGPT+LoRA", base)]
        if matched:
            models.append(("ShortGPT+LoRA r46 (params matched)",
                           {s: run_cell("lora_baseline", {**BASELINE_MATCHED, **b}, s, evals, OUT) for s in seeds}))
        models += [(f"FlexiGPT {n}", {s: run_cell("flexigpt", {**RECIPES[n], **b}, s, evals, OUT) for s in seeds})
                   for n in recipes]
        for name, cells in models:
            ppl = [cells[s]["wikitext2_ppl_2048"] for s in seeds]
            avg = [cells[s]["paper_avg"] for s in seeds]
            dppl = [100 * (cells[s]["wikitext2_ppl_2048"] / base[s]["wikitext2_ppl_2048"] - 1) for s in seeds]
            davg = [cells[s]["paper_avg"] - base[s]["paper_avg"] for s in seeds]
            if matched and name.startswith("FlexiGPT"):
                ref = models[1][1]
                dm = [100 * (cells[s]["wikitext2_ppl_2048"] / ref[s]["wikitext2_ppl_2048"] - 1) for s in seeds]
                name += f" (ΔPPL vs r46: {mean_std(dm)} %)"
            c = cells[seeds[0]]
            lines.append(
                f"| {tokens:,} | {name} | {c.get('trainable_params', 0) / 1e6:.2f}M | {mean_std(ppl)} | "
                + ("—" if name == "ShortGPT+LoRA" else f"{mean_std(dppl)} %")
                + f" | {mean_std(avg)} | " + ("—" if name == "ShortGPT+LoRA" else mean_std(davg))
                + f" | {mean_std([cells[s]['val_ppl'] for s in seeds])} | "
                f"{mean_std([cells[s]['heldout_ppl'] for s in seeds])} | {c['cost']['stored_params'] / 1e6:.1f}M | "
                f"{100 * c['latency_s'] / dense['latency_s']:.0f}% |")
    lines.append(f"| — | dense | — | {dense['wikitext2_ppl_2048']:.2f} | — | {dense['paper_avg']:.2f} | — | "
                 f"{dense['val_ppl']:.2f} | {dense['heldout_ppl']:.2f} | {dense['cost']['stored_params'] / 1e6:.1f}M | 100% |")
    n = len(seeds)
    lines.append(f"\nmean ± std over {n} training seeds {seeds}; Δ = per-seed paired difference against ShortGPT+LoRA "
                 f"(ΔPPL in %, Δavg in points). 5-task avg: {protocol(params_for({})).limit} docs per task "
                 "(stderr ≈ 7 points per task). Latency: forward of 1 heldout sequence vs dense.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("select")
    a.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("report")
    b.add_argument("--recipes", nargs="+", default=["paper"], choices=list(RECIPES))
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--budgets", type=float, nargs="+", default=[1, 4], help="multiples of train.token_budget")
    b.add_argument("--matched", action="store_true", help="also run ShortGPT+LoRA at rank 46 (the kept_* recipes' trainable params)")
    b.add_argument("--write", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args()
    if args.cmd == "select":
        select(args.recipes, args.seed)
    else:
        emit([report(args.recipes, args.seeds, args.budgets, args.matched)], args.write)


if __name__ == "__main__":
    main()
