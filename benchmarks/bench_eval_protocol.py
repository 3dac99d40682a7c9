"""Check the evaluation protocol on the dense model against the reference numbers.

Prints WikiText-2 token PPL @512 and @2048 and 0-shot lm-eval accuracies (reference limits:
HellaSwag first 2000 docs, BoolQ first 1000, the rest full) next to the dense row of
``../shared/docs/reference-numbers.md``. A full run took ~20 min on the reference machine's 2 cores.
On a CPU without native bf16 (no AVX512_BF16 / AMX flags in lscpu) bf16 autocast is emulated and
2-4x slower than float32; there ``--dtype float32`` is the faster choice (the reference notes bf16
and fp32 PPL agree within 0.02%). For a quick look::

    python benchmarks/bench_eval_protocol.py --max-windows 4 --limit-scale 0.02

``--limit-scale s`` evaluates the first ceil(s * N) docs of each task (N = its reference limit or
all docs), so small-scale numbers carry large stderr and are not comparable to the reference.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers / datasets
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import ROOT, data_folder, path  # noqa: E402

from flexigpt.devices import resolve_dtype  # noqa: E402
from flexigpt.errors import FlexiError  # noqa: E402
from flexigpt.evaluate import lm_tasks, perplexity  # noqa: E402

REF_COLUMNS = {"PPL @2048": "ppl@2048", "PPL @512": "ppl@512", "ARC-e": "arc_easy", "ARC-c": "arc_challenge",
               "PIQA": "piqa", "WinoG": "winogrande", "HellaS": "hellaswag", "BoolQ": "boolq",
               "avg of 5": "paper_average"}


def read_reference(path: Path, row: str = "dense") -> dict[str, float]:
    """The ``row`` line of the markdown results table, keyed like our results (accuracies in %)."""
    if not path.is_file():
        return {}
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip().startswith("|")]
    header = next((ln for ln in lines if ln.lower().startswith("| model")), None)
    values = next((ln for ln in lines if ln.split("|")[1].strip() == row), None) if header else None
    if values is None:
        return {}
    cols = [c.strip() for c in header.strip("|").split("|")]
    vals = [c.strip() for c in values.strip("|").split("|")]
    out = {}
    for col, val in zip(cols, vals):
        key = next((k for prefix, k in REF_COLUMNS.items() if col.startswith(prefix)), None)
        if key and re.fullmatch(r"[0-9.]+", val):
            out[key] = float(val)
    return out


def scaled_limits(data: Path, scale: float) -> dict[str, int | None]:
    """Reference limits (HellaSwag 2000, BoolQ 1000, others all), times ``scale`` (rounded up)."""
    if scale == 1.0:
        return {t: lm_tasks.REFERENCE_LIMITS.get(t) for t in lm_tasks.TASKS}
    files = lm_tasks.data_files(data, lm_tasks.TASKS)
    return {t: max(1, math.ceil(scale * (lm_tasks.REFERENCE_LIMITS.get(t) or lm_tasks.count_docs(files[t]))))
            for t in lm_tasks.TASKS}


def row(name: str, ours: float, ref: float | None, extra: str = "") -> str:
    r = f"{ref:8.2f}" if ref is not None else "       -"
    d = f"{ours - ref:+8.2f}" if ref is not None else "       -"
    return f"{name:<16}{ours:9.2f}{r}{d}   {extra}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(path("base_model")), help="imported HF folder (default: paths.base_model)")
    ap.add_argument("--data-dir", default=None, help="offline data folder (default: params data.dir)")
    ap.add_argument("--reference", default=str(ROOT.parent / "shared/docs/reference-numbers.md"))
    ap.add_argument("--windows", type=int, nargs="+", default=[2048, 512], help="PPL window lengths")
    ap.add_argument("--max-windows", type=int, default=None, help="first N windows only (default: all)")
    ap.add_argument("--limit-scale", type=float, default=1.0, help="fraction of the reference doc limits")
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    ap.add_argument("--ppl-batch-size", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="bfloat16 = the reference protocol (bf16 autocast, fp32 log-softmax); auto = bf16 only "
                         "where the hardware has it natively (the reference notes bf16 and fp32 PPL agree to 0.02%%)")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--out", default=None, help="also write all results to this JSON file")
    a = ap.parse_args(argv)
    a.dtype = resolve_dtype(a.dtype, "cpu")  # the model stays on the CPU
    if not 0 < a.limit_scale <= 1:
        raise FlexiError("--limit-scale", f"must be in (0, 1], got {a.limit_scale}", "use e.g. 0.02 or 1")

    from flexigpt.model.importer import load_plain

    data = Path(a.data_dir).resolve() if a.data_dir else data_folder()
    limits = None if a.skip_zero_shot else scaled_limits(data, a.limit_scale)
    ref = read_reference(Path(a.reference))
    model, tok = load_plain(a.model)
    print(f"model {a.model}  dtype {a.dtype}  data {data}\nreference {a.reference if ref else '(not found)'}\n")
    print(f"{'metric':<16}{'ours':>9}{'ref':>8}{'diff':>8}   notes")
    out: dict = {"ppl": {}, "zero_shot": None}

    for w in ([] if a.skip_ppl else a.windows):
        t0 = time.time()
        r = perplexity.wikitext2_token_ppl(model, tok, data, w, batch_size=a.ppl_batch_size, dtype=a.dtype,
                                           max_windows=a.max_windows)
        out["ppl"][w] = r
        print(row(f"ppl@{w}", r["ppl"], ref.get(f"ppl@{w}"),
                  f"{r['windows']} windows, {time.time() - t0:.0f}s; {r['protocol']}"), flush=True)

    if limits is not None:
        t0 = time.time()
        r = lm_tasks.run_zero_shot(model, tok, list(lm_tasks.TASKS), data, limits, batch_size=a.batch_size,
                                   dtype=a.dtype)
        out["zero_shot"] = {k: v for k, v in r.items() if k != "raw"}
        for t, m in r["tasks"].items():
            metric = "acc_norm" if "acc_norm" in m else "acc"
            se = m.get(f"{metric}_stderr")
            print(row(t, 100 * m[metric], ref.get(t),
                      f"{metric}, n={r['n_docs'][t]}" + (f", stderr {100 * se:.2f}" if se is not None else "")))
        avg = 100 * lm_tasks.paper_average(r)
        out["zero_shot"]["paper_average"] = avg / 100
        print(row("paper_average", avg, ref.get("paper_average"), f"5 tasks, no BoolQ; {time.time() - t0:.0f}s"))
    if a.limit_scale < 1 or a.max_windows is not None:
        print("\nnote: reduced run (--limit-scale / --max-windows): not comparable to the reference numbers")
    if a.out:
        from flexigpt.fileio import write_json

        write_json(a.out, lm_tasks.to_jsonable(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FlexiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
