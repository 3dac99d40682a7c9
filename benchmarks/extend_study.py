"""Extension benchmark (issue 7): SmolLM2 30 -> 36 blocks vs the base, at equal training tokens.

    python benchmarks/extend_study.py --seeds 0 1 2 [--budget-mult 1]

Three models per seed, all from the pipeline's artifacts and ``params.yaml`` with ``mode: extend``:
the untouched base; the base continued-trained with LoRA of matching parameter count on every block
(the fair baseline); and FlexiGPT-extended (``extend.*``: blocks 12..17 each repeated twice, own
zero-init adapters and small-γ output norms on each repeat), trained on the same tokens. Prints
heldout PPL and WikiText-2 token PPL (the evaluate stage's, under harness.PROTOCOL), the
validation-slice PPL of the training corpus, the paired per-seed differences, depth and parameter
counts. Cells are cached under ``benchmarks/results/extend`` (see harness.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness import ROOT, emit, mean_std, params_for, run_cell

from flexigpt import variants

OUT = ROOT / "benchmarks" / "results" / "extend"
EVALS = {"val", "suite"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-mult", type=float, default=1.0, help="multiple of train.token_budget")
    ap.add_argument("--write", type=Path, help="also write the table to this markdown file")
    a = ap.parse_args()
    over = {"mode": "extend"}
    if a.budget_mult != 1:
        over["train.token_budget"] = int(params_for({}).int("train.token_budget") * a.budget_mult)
    p = params_for(over)
    dense = run_cell("dense", {}, 0, EVALS, OUT)
    base = {s: run_cell("lora_baseline", over, s, EVALS, OUT) for s in a.seeds}
    ext = {s: run_cell("flexigpt", over, s, EVALS, OUT) for s in a.seeds}
    e = variants.Recipe.from_params(p).extend
    rows = ["| model | depth | trainable | stored | heldout PPL | Δ vs base+LoRA (paired) | val PPL | Δ val (paired) "
            "| WikiText-2 PPL (2048) |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, many: dict[int, dict], ref: dict[int, dict] | None = None) -> str:
        seeds, first = list(many), next(iter(many.values()))

        def stat(k: str) -> str:
            return mean_std([many[s][k] for s in seeds])

        def paired(k: str) -> str:
            return "—" if ref is None else mean_std([100 * (many[s][k] / ref[s][k] - 1) for s in seeds]) + " %"

        return (f"| {name} | {first['cost']['block_executions']} | {first.get('trainable_params', 0) / 1e6:.2f}M | "
                f"{first['cost']['stored_params'] / 1e6:.1f}M | {stat('heldout_ppl')} | {paired('heldout_ppl')} | "
                f"{stat('val_ppl')} | {paired('val_ppl')} | {stat('wikitext2_ppl_2048')} |")

    rows.append(row(variants.label("dense", p), {0: dense}))
    rows.append(row(variants.label("lora_baseline", p), base))
    rows.append(row(f"{variants.label('flexigpt', p)} ({e.pattern} {e.start}..{e.end} x{e.repeats})", ext, base))
    tokens = p.int("train.token_budget")
    rows.append(f"\n{tokens:,} training tokens per model (train split of the calibration corpus); mean ± std over "
                f"seeds {a.seeds}; Δ = per-seed paired difference against base+LoRA. Time and latency overheads "
                "come from one clean `dvc exp run -S mode=extend` (reports/comparison.md there), not from this "
                "script, whose cells may share the cores with other jobs.")
    emit(rows, a.write)


if __name__ == "__main__":
    main()
