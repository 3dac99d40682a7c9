"""The same-budget comparison over several seeds: mean ± std per metric and variant.

    python benchmarks/compare_seeds.py --seeds 0 1 2 [-- extra dvc exp run flags, e.g. -S train.token_budget=196608]

Runs `dvc exp run -n seed<N> -S seed=<N>` per seed (the seed changes the data order of training and the
train/calibration split; the plan usually stays the same), then reads every
experiment's metrics/eval/<variant>.json through `dvc exp show --json` and prints a markdown table.
Expect ~35 min per seed at the default budget on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

METRICS = ("heldout_ppl", "wikitext2_ppl_512", "wikitext2_ppl_2048", "paper_average")


def run_seed(seed: int, extra: list[str]) -> str:
    name = f"seed{seed}"
    cmd = ["dvc", "exp", "run", "-n", name, "-S", f"seed={seed}", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return name


def exp_metrics(names: list[str]) -> dict[str, dict]:
    """{exp name: {metrics file: {...}}} from `dvc exp show --json`."""
    out = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True,
                                    text=True).stdout)
    found: dict[str, dict] = {}

    def visit(node):
        if isinstance(node, dict):
            name = node.get("name")
            data = node.get("data")
            if name in names and isinstance(data, dict):
                found[name] = {f: v.get("data", {}) for f, v in data.get("metrics", {}).items()}
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(out)
    return found


def table(per_exp: dict[str, dict]) -> str:
    rows: dict[tuple[str, str], list[float]] = {}
    for files in per_exp.values():
        for f, data in files.items():
            if "/eval/" not in f:
                continue
            variant = f.rsplit("/", 1)[-1].removesuffix(".json")
            for m in METRICS:
                v = data.get(m)
                if isinstance(v, (int, float)):
                    rows.setdefault((variant, m), []).append(100 * v if m == "paper_average" else v)
    lines = ["| variant | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for variant in sorted({k[0] for k in rows}):
        cells = []
        for m in METRICS:
            xs = rows.get((variant, m), [])
            cells.append(f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} (n={len(xs)})" if len(xs) > 1
                         else (f"{xs[0]:.2f} (n=1)" if xs else ""))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-run", action="store_true", help="only collect existing seed<N> experiments")
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    names = [f"seed{s}" for s in a.seeds] if a.no_run else [run_seed(s, extra) for s in a.seeds]
    print(table(exp_metrics(names)))


if __name__ == "__main__":
    main()
