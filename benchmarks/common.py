"""Shared loading for the benchmark scripts (they run from the project root after `dvc repro`)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def base_model(dtype: str = "float32"):
    from flexigpt.model_import import load_plain

    path = ROOT / "artifacts" / "base_model"
    if not (path / "config.json").is_file():
        sys.exit("no artifacts/base_model: run `dvc repro prepare_calibration` first")
    return load_plain(path, dtype)


def split(name: str) -> torch.Tensor:
    f = ROOT / "artifacts" / "data" / f"{name}.safetensors"
    if not f.is_file():
        sys.exit(f"no {f}: run `dvc repro prepare_calibration` first")
    return load_file(str(f))["input_ids"].long()


def plan():
    from flexigpt.plan import Plan

    f = ROOT / "artifacts" / "plan" / "plan.json"
    if not f.is_file():
        sys.exit(f"no {f}: run `dvc repro prune` first")
    return Plan.load(f)


def parse_with_dtype(ap):
    """Add ``--dtype`` (auto | bfloat16 | float32) to ``ap``, parse, return (args, resolved dtype)."""
    from flexigpt.devices import resolve_dtype

    ap.add_argument("--dtype", default="auto", help="auto (bf16 only where the hardware has it natively) | bfloat16 | float32")
    a = ap.parse_args()
    return a, resolve_dtype(a.dtype)
