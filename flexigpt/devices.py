"""Where and how a stage computes: dtype, thread count, and a record of the machine that ran it.

``auto`` dtype = bf16 where the hardware runs it natively, else float32: on CPUs without
AVX512-BF16/AMX, bf16 autocast is emulated and about 2.5x slower than float32 while perplexity
agrees within 0.02% (measured by ``benchmarks/bench_importance.py`` part a).

Bits depend on the thread count (BLAS reduction order) and on the dtype, so both are settings
(``compute.threads``, ``*.dtype``) and both are recorded with every stage's metrics.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

from .errors import FlexiError


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


def available_cores() -> int:
    """Cores this process may run on (affinity-aware, so a container's CPU set counts, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_threads(threads, local_processes: int = 1, param: str = "compute.threads") -> int:
    """Intra-op threads per process: ``threads`` if given, else the cores shared evenly by the local processes."""
    if threads is None:
        return max(1, available_cores() // max(1, local_processes))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise FlexiError(param, f"must be a whole number >= 1 or null, got {threads!r}",
                         f"set `{param}: null` (all cores) or e.g. 2")
    return threads


def apply_threads(n: int) -> None:
    """Use ``n`` intra-op threads (``accelerate launch`` sets OMP_NUM_THREADS=1 when unset; this overrides it)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


@lru_cache(maxsize=1)
def processor_name() -> str:
    """CPU model (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_info(dtype: str | None = None) -> dict[str, object]:
    """What the results depend on besides code, params and data: device, dtype, threads, hardware."""
    cuda = torch.cuda.is_available()
    info: dict[str, object] = {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else processor_name(),
        "cpu": processor_name(),
        "threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
    }
    if dtype is not None:
        info["dtype"] = resolve_dtype(dtype)
    return info
