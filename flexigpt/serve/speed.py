"""Speed of a model relative to a reference, timed side by side in one process with interleaved repeats.

Wall-clock time on a shared machine drifts (other jobs, thermal state, the allocator), so a model
timed in one process and its reference in another can differ by 40% for nothing. Here both run
in the same process, alternately, and only ratios of medians are reported. The evaluate stage
writes these ratios to its run record (``metrics/timing/evaluate_<variant>.json``, ``cache: false``);
``benchmarks/bench_inference.py`` runs the full sweep.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from flexigpt.model.forward import compute_context
from flexigpt.serve.speculative import generate


def _forward_s(model: nn.Module, batch: torch.Tensor, dtype: str) -> float:
    with torch.inference_mode(), compute_context(dtype, model):
        t0 = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        return time.perf_counter() - t0


def _decode_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, dtype: str, **spec) -> tuple[float, torch.Tensor]:
    with compute_context(dtype, model):
        t0 = time.perf_counter()
        out, _ = generate(model, prompt, new_tokens, eos_token_id=None, **spec)
        return time.perf_counter() - t0, out


def interleaved(jobs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each job, running every job once per repeat in a rotated order."""
    names = list(jobs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate: no job always runs first
            times[n].append(jobs[n]())
    return {n: statistics.median(v) for n, v in times.items()}


def speed_vs_reference(model: nn.Module, reference: nn.Module, batch: torch.Tensor, *, new_tokens: int = 32,
                       prompt_tokens: int = 64, repeats: int = 3, dtype: str = "float32",
                       merged: nn.Module | None = None, draft_tokens: int | None = None) -> dict[str, float | bool]:
    """Forward (``batch``, no cache) and greedy-decode (batch 1) time ratios of ``model`` to ``reference``.

    ``merged``: also time this form of ``model`` (kept blocks' LoRA folded). ``draft_tokens``: also time
    self-speculative decoding of ``merged`` (or ``model``) with K drafted tokens, and check its output
    against plain greedy decoding. Returns ratios (> 1 = slower than the reference, for forward;
    ``*_speedup`` > 1 = faster) and ``speculative_identical``; one warm-up run of each job is not timed.
    """
    prompt = batch[:1, :prompt_tokens]
    jobs: dict[str, Callable[[], float]] = {
        "ref_forward": lambda: _forward_s(reference, batch, dtype),
        "forward": lambda: _forward_s(model, batch, dtype),
        "ref_decode": lambda: _decode_s(reference, prompt, new_tokens, dtype)[0],
        "decode": lambda: _decode_s(model, prompt, new_tokens, dtype)[0],
    }
    server = merged if merged is not None else model
    if merged is not None:
        jobs["merged_forward"] = lambda: _forward_s(merged, batch, dtype)
        jobs["merged_decode"] = lambda: _decode_s(merged, prompt, new_tokens, dtype)[0]
    same = {}
    if draft_tokens is not None:
        plain = _decode_s(server, prompt, new_tokens, dtype)[1]

        def spec() -> float:
            s, out = _decode_s(server, prompt, new_tokens, dtype, speculative=True, draft_tokens=draft_tokens)
            same["ok"] = same.get("ok", True) and torch.equal(out, plain)
            return s
        jobs["speculative_decode"] = spec
    for fn in jobs.values():  # warm-up: first-call allocations and lazy inits are not timed
        fn()
    med = interleaved(jobs, repeats)
    out: dict[str, float | bool] = {"forward_vs_dense": med["forward"] / med["ref_forward"],
                                    "decode_time_vs_dense": med["decode"] / med["ref_decode"]}
    if merged is not None:
        out["merged_forward_vs_dense"] = med["merged_forward"] / med["ref_forward"]
        out["merged_decode_time_vs_dense"] = med["merged_decode"] / med["ref_decode"]
    if draft_tokens is not None:
        plain_key = "merged_decode" if merged is not None else "decode"
        out["speculative_speedup"] = med[plain_key] / med["speculative_decode"]
        out["speculative_identical"] = bool(same.get("ok", False))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def variant_speed(model: nn.Module, dense: nn.Module, heldout: torch.Tensor, *, dtype: str = "float32",
                  repeats: int = 3, draft_tokens: int = 3) -> dict[str, float | bool]:
    """The evaluate stage's speed record of one variant against dense (see :func:`speed_vs_reference`).

    A FlexiGPT model (replaced positions) also gets its merged form and self-speculative decoding
    with ``draft_tokens``; other variants get forward and decode ratios only.
    """
    from flexigpt.model import checkpoint
    from flexigpt.model import flexi as fm

    spec = fm.spec_of(model)
    flexi = spec is not None and bool(spec.replaced)
    merged = checkpoint.merge(model) if flexi else None
    return speed_vs_reference(model, dense, heldout[:1], repeats=repeats, dtype=dtype, merged=merged,
                              draft_tokens=draft_tokens if flexi else None)
