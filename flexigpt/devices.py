"""The one device and precision policy: where a stage computes, in which dtype, on how many threads.

* Device (``compute.device``): ``auto`` = CUDA when a GPU is visible, else CPU. Every stage moves
  its model there (:func:`place`); :func:`flexigpt.model.forward.compute_context` autocasts on
  that device's type, so the same code runs on CPU and CUDA.
* Compute dtype (``*.dtype``): ``auto`` = bfloat16 where the device runs it natively (CUDA with
  bf16, CPUs with AVX512-BF16/AMX), else float32. On other CPUs bf16 is emulated and slower with
  no accuracy gain (``benchmarks/bench_importance.py``, part a). ``auto`` never picks float16:
  evaluation and scoring run float32 or bfloat16 only; training may ask for float16 explicitly.

Bits depend on the device, the thread count (BLAS reduction order) and the dtype, so all three are
settings and all three are recorded with every stage's metrics (:func:`runtime_info`).
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

from dataclasses import dataclass

import torch

from flexigpt.config import Settings, setting
from flexigpt.errors import FlexiError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ComputeSettings(Settings):
    """How stages compute (params ``compute.*``); results depend on it bit for bit."""

    SECTION = "compute"
    threads: int | None = setting(None, "intra-op CPU threads per process; null = cores / local processes",
                                  type=int, min=1)
    device: str = setting("auto", "auto (cuda when visible, else cpu) | cpu | cuda", choices=DEVICES)

    def check(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise FlexiError("compute.device", "is cuda, but torch sees no CUDA device here",
                             "set `compute.device: auto` (or cpu), or run on a machine with a GPU")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu`` (the local rank's GPU under a launcher)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    return torch.device(name)


def place(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move ``model`` to ``device`` (no-op when it is there) and return it."""
    device = torch.device(device)
    if next(model.parameters()).device != device:
        model.to(device)
    return model


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> ``bfloat16`` where ``device`` (default: the ``auto`` device) runs it natively, else ``float32``."""
    if name != "auto":
        return name
    kind = torch.device(device).type if device is not None else resolve_device("auto").type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
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


def runtime_info(dtype: str | None = None, device: torch.device | str | None = None) -> dict[str, object]:
    """What the results depend on besides code, params and data: device, dtype, threads, hardware."""
    dev = torch.device(device) if device is not None else resolve_device("auto")
    cuda = dev.type == "cuda"
    info: dict[str, object] = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(0) if cuda else processor_name(),
        "cpu": processor_name(),
        "threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
    }
    if dtype is not None:
        info["dtype"] = resolve_dtype(dtype, dev)
    return info
