"""Benchmark importance scoring and base selection (issue 3). Prints every number it measures.

(a) BI scoring throughput vs a plain forward pass of the same backbone on the same tokens and batch
    (hooks + cosine maths overhead, target <= 10 %), per compute dtype.
(b) Base selection (Eqs. 2-5) on SmolLM2: all pruned x unpruned pairs at r = 32 and r = 256
    (target < 10 s on 2 cores), split into the per-weight truncated SVDs and the pair computations,
    for each ``prune.precision`` (float32 is compared with float64: deviation, same bases?); the
    floor of the exact method's kernels (b-floor); then one synthetic LLaMA-2-7B block pair (4096x4096 x4, 11008x4096 x2, 4096x11008 x1, random),
    extrapolated to 32 blocks' SVDs + 10 x 22 = 220 pair computations.
(c) Peak memory of scoring, measured in a child process from the kernel's RSS high-water mark
    (VmHWM, reset after the model is loaded), against model bytes + 3 x one batch of activations
    (definitions printed with the numbers), for 1 and 3 streamed batches (streaming: no growth).

Run from the project root after `dvc repro score_importance`:
    python benchmarks/bench_importance.py [--parts a,b,c] [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, base_model, path, split

from flexigpt.compress import distance as dist
from flexigpt.compress import importance as imp
from flexigpt.compress import plan as pl
from flexigpt.model.arch import arch_of
from flexigpt.model.forward import compute_context

MiB = 2 ** 20


def load_model():
    return base_model("float32")[0]


def load_tokens(n: int, seq: int) -> torch.Tensor:
    return split("calibration", n)[:, :seq]


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# -- (a) throughput ----------------------------------------------------------------------------------------
def plain_forward(model, ids: torch.Tensor, dtype: str) -> float:
    body = arch_of(model).backbone()
    with torch.inference_mode(), compute_context(dtype, model):
        t = time.perf_counter()
        body(input_ids=ids, use_cache=False)
        return time.perf_counter() - t


def hooked_forward(model, ids: torch.Tensor, dtype: str) -> float:
    t = time.perf_counter()
    imp.cosine_scores(model, ids, batch_size=ids.shape[0], dtype=dtype, progress=False)
    return time.perf_counter() - t


def part_a(batch: int, seq: int, repeats: int, dtypes: list[str]) -> None:
    print(f"\n(a) BI scoring vs plain forward: batch {batch} x {seq} tokens, {repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads, load avg {load_avg()}")
    model, ids = load_model(), load_tokens(batch, seq)
    print(f"{'dtype':<10}{'plain s':>10}{'BI s':>10}{'plain tok/s':>14}{'BI tok/s':>12}{'overhead':>10}")
    for dtype in dtypes:
        plain_forward(model, ids[:1, :32], dtype)  # warm-up
        plain, hooked = [], []
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            plain.append(plain_forward(model, ids, dtype))
            hooked.append(hooked_forward(model, ids, dtype))
        p, h = statistics.median(plain), statistics.median(hooked)
        n = ids.numel()
        print(f"{dtype:<10}{p:>10.2f}{h:>10.2f}{n / p:>14.0f}{n / h:>12.0f}{100 * (h - p) / p:>9.1f}%"
              f"   (min-based overhead {100 * (min(hooked) - min(plain)) / min(plain):+.1f}%)")


# -- (b) base selection --------------------------------------------------------------------------------------
def pruned_set(L: int) -> tuple[list[int], str]:
    f = path("importance") / "importance.json"
    if f.is_file():
        scores = json.loads(f.read_text())["scores"]
        return pl.choose_pruned(scores, ratio=0.3), f"from {f} (ratio 0.3)"
    n = pl.n_from_ratio(0.3, L)
    return sorted({round(k * (L - 1) / (n - 1)) for k in range(n)}), "evenly spaced (no importance.json yet)"


def time_factors(arch, blocks: list[int], rank: int, svd: str, precision: str = "float64") -> float:
    t = time.perf_counter()
    for b in blocks:
        for k, w in arch.weights(b).items():
            r = min(rank, *w.shape)
            if r < min(w.shape):  # clamped matrices are skipped by distance_table too
                dist.truncated_svd(w.detach(), r, svd, dist.PRECISIONS[precision])
    return time.perf_counter() - t


def part_b_smollm(svd_methods: list[str], precisions: list[str]) -> None:
    model = load_model()
    a = arch_of(model)
    L = a.num_blocks
    pruned, how = pruned_set(L)
    n_pairs = len(pruned) * (L - len(pruned))
    print(f"\n(b) base selection on SmolLM2: {len(pruned)} pruned {pruned} ({how}) x {L - len(pruned)} unpruned "
          f"= {n_pairs} pairs x 7 matrices; load avg {load_avg()}")
    print(f"{'rank':>5} {'svd':<7}{'precision':<10}{'total s':>9}{'SVDs s':>9}{'pairs s':>9}  target < 10 s "
          "(SVDs timed separately; pairs = total - SVDs); deviation = max |d / d_float64 - 1| over all pairs")
    for rank in (32, 256):
        for svd in svd_methods:
            ref = None
            for prec in precisions:
                t_fac = time_factors(a, list(range(L)), rank, svd, prec)
                t = time.perf_counter()
                table, _ = dist.distance_table(a, pruned, rank=rank, svd=svd, progress=False, precision=prec)
                total = time.perf_counter() - t
                bases = dist.choose_bases(table)
                if prec == "float64":
                    ref = (table, bases)
                    cmp = ""
                elif ref is not None:
                    dev = max(abs(table[i][j] / ref[0][i][j] - 1) for i in table for j in table[i])
                    cmp = f"; deviation {dev:.1e}, bases {'same as' if bases == ref[1] else 'DIFFER from'} float64"
                else:
                    cmp = ""
                print(f"{rank:>5} {svd:<7}{prec:<10}{total:>9.2f}{t_fac:>9.2f}{max(total - t_fac, 0):>9.2f}  "
                      f"{'ok' if total < 10 else 'MISSED'}; bases {bases}{cmp}")


def part_b_floor(n_problems: int = 945, n_factors: int = 150, r: int = 256, d: int = 576) -> None:
    """Floor of exact base selection at rank r on 2 cores: the dense kernels it cannot avoid, timed
    single-threaded and spread over the cores, per precision. Defaults: SmolLM2 at r = 256.
    Kernels: the 2r x 2r eigenvalue problem, its assembly (r x r Cholesky + six r x r products, see
    distance._core_orthonormal) and one Gram eigendecomposition (d x d) per truncated SVD."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    try:
        for prec in (torch.float64, torch.float32):
            a = torch.randn(4, 2 * r, 2 * r, dtype=prec)
            sym = a @ a.mT + 2 * r * torch.eye(2 * r, dtype=prec)
            blk = torch.randn(4, r, r, dtype=prec)
            ga, ge = blk @ blk.mT, blk.mT @ blk   # SPD diagonal blocks of PᵀP
            c = 0.5 * torch.linalg.qr(torch.randn(4, r, r, dtype=prec)).Q
            g = torch.randn(d, d, dtype=prec)
            g = g @ g.mT

            def per_call(f, n: int) -> float:
                f()
                t = time.perf_counter()
                for _ in range(3):
                    f()
                return (time.perf_counter() - t) / 3 / n

            eig = per_call(lambda: torch.linalg.eigvalsh(sym), 4)
            core = per_call(lambda: dist._core_orthonormal(ga, ge, blk, c), 4)
            fac = per_call(lambda: torch.linalg.eigh(g), 1)
            parts = {"eigenvalues": eig * n_problems, "assembly": core * n_problems, "factors": fac * n_factors}
            print(f"\n(b-floor) exact r = {r}, {str(prec).replace('torch.', '')}: {n_problems} eigenproblems of "
                  f"{2 * r} + {n_factors} Gram eigh of {d}, single-threaded kernels over {cores} cores: "
                  + ", ".join(f"{k} {v / cores:.1f} s" for k, v in parts.items())
                  + f"; total floor {sum(parts.values()) / cores:.1f} s (without the r x d cross products)")
    finally:
        torch.set_num_threads(threads)


def part_b_7b(rank: int, svd_methods: list[str], precisions: list[str]) -> None:
    print(f"\n(b') synthetic LLaMA-2-7B block pair at r = {rank}: 4 x (4096x4096), 2 x (11008x4096), "
          f"1 x (4096x11008), random; load avg {load_avg()}")
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
              "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
    rows = []
    for svd in svd_methods:
        # per-block SVD time: one square and one rectangular matrix timed, scaled by their counts
        per = {}
        facs = {}
        for kind, shape in (("square", (4096, 4096)), ("rect", (11008, 4096))):
            w = torch.randn(*shape, generator=g) / 64
            t = time.perf_counter()
            facs[kind] = dist.truncated_svd(w, rank, svd)
            per[kind] = time.perf_counter() - t
            del w
        block_svd = 4 * per["square"] + 3 * per["rect"]
        rows.append((svd, per, block_svd))
    # one pair = the 7 closed-form residuals (factor method does not matter for this part)
    pair = {}
    for prec in precisions:
        t_pair = 0.0
        for name, shape in shapes.items():
            m, n = shape
            fi = (torch.randn(m, rank, generator=g), torch.linalg.qr(torch.randn(n, rank, generator=g))[0])
            fj = (torch.randn(m, rank, generator=g), torch.linalg.qr(torch.randn(n, rank, generator=g))[0])
            t = time.perf_counter()
            dist.lowrank_residual(*fi, *fj, rank, precision=dist.PRECISIONS[prec])
            t_pair += time.perf_counter() - t
        pair[prec] = t_pair
        print(f"one pair (7 closed-form residuals, 2r = {2 * rank}, {prec}): {t_pair:.2f} s")
    for svd, per, block_svd in rows:
        for prec, t_pair in pair.items():
            total = 32 * block_svd + 220 * t_pair
            print(f"svd={svd:<10} pairs in {prec}: one 4096x4096: {per['square']:.2f} s, one 11008x4096: "
                  f"{per['rect']:.2f} s -> one block {block_svd:.1f} s; extrapolated 32 x {block_svd:.1f} + "
                  f"220 x {t_pair:.2f} = {total:.0f} s ({total / 60:.1f} min)")


# -- (c) memory ---------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(batch: int, seq: int, n_batches: int, dtype: str) -> None:
    """Runs in a subprocess: RSS at start, after loading (weights paged in), and the scoring high-water mark."""
    start = _rss_kib("VmRSS")
    model = load_model()
    with torch.no_grad():  # safetensors weights may be mmapped lazily: page them all in before the baseline
        for p in model.parameters():
            p.sum()
    ids = load_tokens(batch * n_batches, seq)
    imp.cosine_scores(model, ids[:1, :16], batch_size=1, dtype=dtype, progress=False)  # allocator/kernel warm-up
    loaded = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    imp.cosine_scores(model, ids, batch_size=batch, dtype=dtype, progress=False)
    peak = _rss_kib("VmHWM")
    a = arch_of(model)
    print(json.dumps({"start_kib": start, "loaded_kib": loaded, "peak_kib": peak, "hwm_reset": reset,
                      "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "hidden": a.hidden_size, "blocks": a.num_blocks,
                      "intermediate": int(getattr(model.config, "intermediate_size", 0)),
                      "heads": int(getattr(model.config, "num_attention_heads", 0))}))


def part_c(batch: int, seq: int, dtypes: list[str], batch_counts: list[int]) -> None:
    print(f"\n(c) peak memory of BI scoring, batch {batch} x {seq}; load avg {load_avg()}")
    print("    definitions: act = one batch of activations = batch x seq x hidden x 4 B x (blocks + 1), i.e. every "
          "fp32 hidden state of one forward pass (what output_hidden_states would keep);\n"
          "    budget = model bytes + 3 x act; scoring memory = model bytes + scoring extra, where scoring extra = "
          "VmHWM during scoring - RSS after loading (weights paged in) and a warm-up call;\n"
          "    process peak = VmHWM - RSS at interpreter start (includes loader residue), for reference")
    for dtype in dtypes:
        for nb in batch_counts:
            out = subprocess.run([sys.executable, __file__, "--memory-child", "--batch", str(batch), "--seq", str(seq),
                                  "--n-batches", str(nb), "--dtypes", dtype], capture_output=True, text=True,
                                 cwd=ROOT)
            line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
            if line is None:
                print(f"    child failed: {out.stderr[-500:]}")
                continue
            d = json.loads(line)
            hidden1 = batch * seq * d["hidden"] * 4
            act = hidden1 * (d["blocks"] + 1)
            budget = d["model_bytes"] + 3 * act
            peak = (d["peak_kib"] - d["start_kib"]) * 1024
            extra = (d["peak_kib"] - d["loaded_kib"]) * 1024
            attn = batch * d["heads"] * seq * seq * 4
            mlp = batch * seq * d["intermediate"] * 4 * 3
            used = d["model_bytes"] + extra
            model_mib = d["model_bytes"] / MiB
            print(f"    {dtype:<9} {nb:>2} batch(es) of {batch}: scoring memory {used / MiB:.0f} MiB (model "
                  f"{model_mib:.0f} + extra {extra / MiB:.0f}) vs budget {budget / MiB:.0f} MiB (model + 3 x "
                  f"{act / MiB:.0f}) -> {'within' if used <= budget else 'OVER'}; extra = {extra / hidden1:.1f} fp32 "
                  f"hidden states of one batch ({hidden1 / MiB:.1f} MiB each; one MLP's gate/up/act "
                  f"{mlp / MiB:.0f} MiB, eager attention scores {attn / MiB:.0f} MiB); process peak {peak / MiB:.0f} MiB"
                  + ("" if d["hwm_reset"] else " [VmHWM could not be reset: extra is an upper bound]"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,b7,c", help="comma list of a, b, b7 (the 7B extrapolation), c")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--svd", default="gram,exact", help="factor methods for part b")
    ap.add_argument("--precision", default="float64,float32", help="prune.precision values for part b (float64 first: "
                    "the others are compared with it)")
    ap.add_argument("--svd-7b", default="gram,randomized", help="factor methods for the 7B extrapolation")
    ap.add_argument("--batch-counts", default="1,3", help="part c: numbers of batches to stream")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n-batches", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if args.memory_child:
        memory_child(args.batch, args.seq, args.n_batches, dtypes[0])
        return
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if "a" in parts:
        part_a(args.batch, args.seq, args.repeats, dtypes)
    if "b" in parts:
        part_b_smollm(args.svd.split(","), args.precision.split(","))
        part_b_floor()
    if "b7" in parts:
        part_b_7b(256, args.svd_7b.split(","), args.precision.split(","))
    if "c" in parts:
        part_c(args.batch, args.seq, dtypes, [int(x) for x in args.batch_counts.split(",")])


if __name__ == "__main__":
    main()
