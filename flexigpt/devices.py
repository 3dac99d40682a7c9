"""Compute-dtype choice: ``auto`` = bf16 where the hardware runs it natively, else float32.

On CPUs without AVX512-BF16/AMX, bf16 autocast is emulated and ~2.5x *slower* than float32
(`benchmarks/bench_importance.py` part a, this project's 2-core CI machine, SmolLM2, batch 4x512:
651 tok/s fp32 vs 259 tok/s bf16 forward), while perplexity agrees within 0.02%.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> str:
    """``auto`` -> ``bfloat16`` on GPUs with bf16 or CPUs with native bf16, else ``float32``."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"
