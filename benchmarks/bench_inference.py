"""Inference speed of every variant side by side, in one process: prefill forward and greedy decode.

    python benchmarks/bench_inference.py [--quick] [--repeats 3] [--new-tokens 128] [--ks 1 2 3 4 6]
    python benchmarks/bench_inference.py --tiny     # the whole script on tiny random models (numbers meaningless)

Models, from the pipeline's artifacts (params.yaml ``paths.*``; run `make repro` first):

* dense: ``paths.base_model``;  ShortGPT: the plan's pruned blocks removed (``paths.plan``);
* ShortGPT+LoRA: ``paths.trained``/lora_baseline, as stored (LoRA unmerged);
* FlexiGPT unmerged: ``paths.trained``/flexigpt (LoRA on every block, as trained);
* FlexiGPT merged: the same model with the kept blocks' LoRA folded (:func:`checkpoint.merge`);
* FlexiGPT speculative: the merged model drafting with its replaced positions skipped, the best K
  of a small sweep (its acceptance rate reported); dense skip-draft: the dense model drafting with
  the plan's pruned blocks skipped (no training), best K.

Measured: forward prefill of 1 x T and 8 x T heldout tokens (T = ``calibration.seq_len``, 512; no KV
cache, logits included: :func:`cost.forward_latency`), and greedy decode of batch 1 (the first 64
heldout tokens as prompt, exactly ``--new-tokens`` new tokens, no EOS stop) in tokens/s. Each repeat
runs every measurement of every model once, in a rotated order, so a change in machine load hits
all models alike; the table gives medians and ratios to dense. Speculative outputs are checked
token for token against plain greedy decoding of the same model (``identical``).

Results go to ``benchmarks/results/inference.json`` (wall-clock figures: not a pipeline output).
The last line printed is::

    forward_merged_vs_dense=<x> decode_speculative_vs_plain=<y> identical=<true|false>

x = FlexiGPT merged / dense median 1 x T prefill time; y = FlexiGPT speculative / plain FlexiGPT
(merged, the same verifier) decode tokens/s; identical = every speculative output equals its plain
reference. ``--quick`` (about 5 minutes on 2 cores): 2 repeats, 1 x T prefill only, 32 new tokens,
K in {2, 4}.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import PARAMS, ROOT, base_model, parse_with_dtype, path, plan, split  # first: puts the project on sys.path

from flexigpt import variants
from flexigpt.devices import ComputeSettings, apply_threads, resolve_threads, runtime_info
from flexigpt.evaluate import cost
from flexigpt.fileio import write_json
from flexigpt.model import checkpoint
from flexigpt.model import flexi as fm
from flexigpt.model.forward import compute_context
from flexigpt.serve import generate

OUT = ROOT / "benchmarks" / "results" / "inference.json"
PROMPT_TOKENS = 64
LABELS = {"dense": "dense", "shortgpt": "ShortGPT", "lora_baseline": "ShortGPT+LoRA",
          "flexigpt": "FlexiGPT unmerged", "flexigpt_merged": "FlexiGPT merged"}


# -- the models ---------------------------------------------------------------------------------------

def pipeline_models() -> tuple[dict[str, torch.nn.Module], list[int], torch.Tensor]:
    """(models by name, the plan's pruned blocks, heldout rows) from the pipeline's artifacts."""
    base, _ = base_model()  # each loader exits with the stage to run when its artifact is missing
    pl = plan()
    heldout = split("heldout", 8)
    models = {"dense": base, "shortgpt": variants.build_variant(base, "shortgpt", PARAMS, pl)}
    for v in ("lora_baseline", "flexigpt"):
        folder = path("trained") / v
        if not (folder / checkpoint.MANIFEST).is_file():
            sys.exit(f"no trained {v} model at {folder}: run `dvc repro train_{v}` (or `make repro`) first")
        models[v] = checkpoint.load(folder)
    models["flexigpt_merged"] = checkpoint.merge(models["flexigpt"])
    return models, list(pl.pruned), heldout


def tiny_models() -> tuple[dict[str, torch.nn.Module], list[int], torch.Tensor]:
    """The same five models from a tiny random Llama (checks the script; the numbers mean nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    dense = LlamaForCausalLM(cfg).eval()
    base, lora = {2: 1, 5: 6}, fm.LoraSettings(rank=4)

    def trained(m: torch.nn.Module) -> torch.nn.Module:  # non-zero LoRA B, as after training
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        return m

    models = {"dense": dense, "shortgpt": fm.build(copy.deepcopy(dense), fm.shortgpt_spec(8, sorted(base))),
              "lora_baseline": trained(fm.build(copy.deepcopy(dense), fm.shortgpt_spec(8, sorted(base), lora))),
              "flexigpt": trained(fm.build(copy.deepcopy(dense), fm.prune_spec(8, base, lora, lora_on_kept=True)))}
    models["flexigpt_merged"] = checkpoint.merge(models["flexigpt"])
    return models, sorted(base), torch.randint(0, 256, (8, 512))


# -- one measurement ------------------------------------------------------------------------------------

def prefill_s(model: torch.nn.Module, batch: torch.Tensor, dtype: str) -> float:
    return cost.forward_latency(model, batch, repeats=1, warmup=0, dtype=dtype)["median_s"]


def decode(model: torch.nn.Module, prompt: torch.Tensor, n: int, dtype: str,
           **spec) -> tuple[float, torch.Tensor, dict]:
    """(seconds, output tokens, stats) of greedy decoding ``n`` new tokens (no EOS stop)."""
    with compute_context(dtype, model):
        t0 = time.perf_counter()
        out, stats = generate(model, prompt, n, eos_token_id=None, **spec)
        return time.perf_counter() - t0, out, stats.to_dict()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the run ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 repeats, 1 x T prefill only, 32 new tokens, K in {2, 4}")
    ap.add_argument("--tiny", action="store_true", help="tiny random models instead of the pipeline's (a self-check)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode length (default 128; quick 32)")
    ap.add_argument("--ks", type=int, nargs="+", default=None,
                    help="draft lengths K swept (default 1 2 3 4 6; quick 2 4)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: params compute.threads)")
    ap.add_argument("--out", default=None, help=f"results JSON (default {OUT.relative_to(ROOT)}; none with --tiny)")
    a, dtype = parse_with_dtype(ap)
    repeats = a.repeats or (2 if a.quick else 3)
    new_tokens = a.new_tokens or (32 if a.quick else 128)
    ks = a.ks or ([2, 4] if a.quick else [1, 2, 3, 4, 6])
    batches = [1] if a.quick else [1, 8]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate()'s per-call notices would bury the table
    apply_threads(resolve_threads(a.threads or ComputeSettings.from_params(PARAMS).threads))  # as the stages do
    t_start = time.time()
    models, pruned, heldout = tiny_models() if a.tiny else pipeline_models()
    seq = heldout.shape[1]
    prompt = heldout[:1, :PROMPT_TOKENS]
    print(f"{len(models)} models, pruned {pruned}; prefill {batches} x {seq}, decode 1 x {new_tokens} new tokens "
          f"after {prompt.shape[1]}, K in {ks}, {repeats} repeats, {dtype}, {torch.get_num_threads()} threads",
          flush=True)

    # jobs: (key, model, fn -> seconds); speculative ones also keep their stats and identity check
    refs: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    identical: dict[str, bool] = {}
    jobs: list[tuple[str, Callable[[], float]]] = []
    for name, m in models.items():
        for b in batches:
            if b <= heldout.shape[0]:
                jobs.append((f"{name}|prefill_{b}x{seq}", lambda m=m, b=b: prefill_s(m, heldout[:b], dtype)))
        jobs.append((f"{name}|decode", lambda m=m: decode(m, prompt, new_tokens, dtype)[0]))

    def speculative_job(key: str, model: torch.nn.Module, ref: str, **spec) -> Callable[[], float]:
        def run() -> float:
            s, out, st = decode(model, prompt, new_tokens, dtype, speculative=True, **spec)
            identical[key] = identical.get(key, True) and torch.equal(out, refs[ref])
            stats[key] = st
            return s
        return run

    for k in ks:
        jobs.append((f"flexigpt_speculative|K={k}",
                     speculative_job(f"flexigpt_speculative|K={k}", models["flexigpt_merged"], "flexigpt_merged",
                                     draft_tokens=k)))
        jobs.append((f"dense_skip_draft|K={k}",
                     speculative_job(f"dense_skip_draft|K={k}", models["dense"], "dense", draft_tokens=k, skip=pruned)))

    # warm-up (not timed): plain references for the identity checks, one short prefill each
    for name, m in models.items():
        prefill_s(m, heldout[:1, :64], dtype)
        refs[name] = decode(m, prompt, new_tokens, dtype)[1]
    times: dict[str, list[float]] = {key: [] for key, _ in jobs}
    for r in range(repeats):
        order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]  # rotate: no model always runs first
        for key, fn in order:
            times[key].append(fn())
        print(f"repeat {r + 1}/{repeats} done ({time.time() - t_start:.0f} s)", flush=True)

    # -- report ---------------------------------------------------------------------------------------------
    med = {k: median(v) for k, v in times.items()}
    tok_s = {k: new_tokens / v for k, v in med.items() if k.endswith("|decode") or "|K=" in k}
    best = {kind: max((k for k in tok_s if k.startswith(kind + "|")), key=tok_s.get)
            for kind in ("flexigpt_speculative", "dense_skip_draft")}
    rows: dict[str, dict] = {}
    for name in models:
        rows[name] = {f"prefill_{b}x{seq}_s": med.get(f"{name}|prefill_{b}x{seq}") for b in batches}
        rows[name]["decode_tok_s"] = tok_s[f"{name}|decode"]
        rows[name]["flops_per_token"] = cost.count_cost(models[name]).flops_per_token
    for kind, key in best.items():
        sweep = {k.split("|")[1]: {"decode_tok_s": tok_s[k], "acceptance_rate": stats[k]["acceptance_rate"]}
                 for k in tok_s if k.startswith(kind + "|")}
        rows[kind] = {"decode_tok_s": tok_s[key], "best_k": int(key.split("K=")[1]), **stats[key], "sweep": sweep}
    dense = rows["dense"]
    for name, row in rows.items():
        for b in batches:
            key = f"prefill_{b}x{seq}_s"
            if row.get(key) is not None:
                row[f"prefill_{b}x{seq}_vs_dense"] = row[key] / dense[key]
        row["decode_vs_dense"] = row["decode_tok_s"] / dense["decode_tok_s"]
    print(f"\n{'model':26s}" + "".join(f"{f'prefill {b}x{seq} s':>17s} {'x dense':>8s}" for b in batches)
          + f" {'decode tok/s':>13s} {'x dense':>8s}  notes")
    for name, row in rows.items():
        label = LABELS.get(name, {"flexigpt_speculative": "FlexiGPT speculative",
                                  "dense_skip_draft": "dense + skip-draft"}.get(name, name))
        cells = "".join(f"{row[f'prefill_{b}x{seq}_s']:17.3f} {row[f'prefill_{b}x{seq}_vs_dense']:8.3f}"
                        if f"prefill_{b}x{seq}_s" in row and row[f"prefill_{b}x{seq}_s"] is not None
                        else f"{'':17s} {'':8s}" for b in batches)
        note = (f"K={row['best_k']}, acceptance {100 * row['acceptance_rate']:.1f}%, "
                f"{row['tokens_per_round']:.2f} tokens/round" if "best_k" in row else "")
        print(f"{label:26s}{cells} {row['decode_tok_s']:13.2f} {row['decode_vs_dense']:8.3f}  {note}")
    same = all(identical.values())
    x = rows["flexigpt_merged"][f"prefill_1x{seq}_vs_dense"]
    y = rows["flexigpt_speculative"]["decode_tok_s"] / rows["flexigpt_merged"]["decode_tok_s"]
    result = {
        "settings": {"quick": a.quick, "tiny": a.tiny, "repeats": repeats, "new_tokens": new_tokens,
                     "prompt_tokens": int(prompt.shape[1]), "prefill_batches": batches, "seq_len": seq, "ks": ks,
                     "dtype": dtype, "pruned": pruned, "speculative_on": "flexigpt_merged"},
        "runtime": runtime_info(dtype, "cpu"),
        "models": rows,
        "sizes_flexigpt": checkpoint.form_sizes(models["flexigpt"]),
        "identical": {k: bool(v) for k, v in identical.items()},
        "times_s": times,
        "summary": {"forward_merged_vs_dense": x, "decode_speculative_vs_plain": y,
                    "decode_speculative_vs_unmerged": rows["flexigpt_speculative"]["decode_tok_s"]
                    / rows["flexigpt"]["decode_tok_s"], "identical": same},
        "wall_s": time.time() - t_start,
    }
    out = Path(a.out) if a.out else (None if a.tiny else OUT)
    if out is not None:
        write_json(out, result)
        print(f"\nwrote {out}")
    print(f"forward_merged_vs_dense={x:.3f} decode_speculative_vs_plain={y:.3f} identical={str(same).lower()}")


if __name__ == "__main__":
    main()
