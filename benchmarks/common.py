"""Shared loading for the benchmark scripts: the pipeline's artifacts, found where params.yaml's
``paths.*`` puts them (run `dvc repro` first; each loader names the stage to run when one is missing)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexigpt.config import Params, data_dir  # noqa: E402
from flexigpt.data.splits import load_split  # noqa: E402
from flexigpt.errors import FlexiError  # noqa: E402

PARAMS = Params.load(ROOT / "params.yaml")


def path(key: str) -> Path:
    """Where the pipeline writes ``paths.<key>`` (relative to the project root, as the stages run)."""
    return ROOT / PARAMS.str(f"paths.{key}")


def data_folder(p: Params = PARAMS) -> Path:
    """The offline data folder (params ``data.dir``, relative to the project root)."""
    return (ROOT / data_dir(p)).resolve()


def base_model(dtype: str = "float32"):
    from flexigpt.model.importer import load_plain

    folder = path("base_model")
    if not (folder / "config.json").is_file():
        sys.exit(f"no model at {folder}: run `dvc repro import_model` first")
    return load_plain(folder, dtype)


def split(name: str, n: int | None = None) -> torch.Tensor:
    """Split ``name`` (calibration | train | heldout), its first ``n`` sequences when given."""
    try:
        return load_split(path("data"), name, n)
    except FlexiError as e:  # says to run `dvc repro prepare_calibration`
        sys.exit(f"error: {e}")


def plan():
    from flexigpt.compress.plan import Plan

    try:
        return Plan.load(path("plan"))
    except FlexiError as e:  # says to run `dvc repro prune`
        sys.exit(f"error: {e}")


def parse_with_dtype(ap):
    """Add ``--dtype`` (auto | bfloat16 | float32) to ``ap``, parse, return (args, resolved dtype)."""
    from flexigpt.devices import resolve_dtype

    ap.add_argument("--dtype", default="auto", help="auto (bf16 only where the CPU has it natively) | bfloat16 | float32")
    a = ap.parse_args()
    return a, resolve_dtype(a.dtype, "cpu")  # these benchmarks keep the model on the CPU
