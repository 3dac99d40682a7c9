"""Forward passes shared by every phase: batching, the autocast context, and mean next-token NLL.

Scoring (``importance``), start-PPL checks (``svd_init``), training's heldout check and evaluation
(``perplexity``, ``cost``, ``lm_tasks``) all run the model through these, so evaluation never
imports compression code, and there is one autocast policy: bf16 autocast on the device the model
sits on (CPU or CUDA), float32 otherwise; log-softmax is always float32.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexigpt.model.arch import arch_of
from flexigpt.errors import FlexiError

DTYPES = ("float32", "bfloat16")


def check_dtype(dtype: str, param: str = "importance.dtype") -> str:
    if dtype not in DTYPES:
        raise FlexiError(param, f"unsupported compute dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}")
    return dtype


def check_input_ids(input_ids: torch.Tensor, param: str = "paths.data") -> torch.Tensor:
    """Calibration tokens as int64 [N, T] with N >= 1 and T >= 2."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] < 1 \
            or input_ids.shape[1] < 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise FlexiError(param, f"calibration input_ids must be an integer tensor [N>=1, T>=2], got {shape}",
                         "re-run the prepare_calibration stage (`dvc repro prepare_calibration`)")
    return input_ids.long()


def iter_batches(input_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row batches of ``input_ids`` (the last one may be smaller)."""
    for s in range(0, input_ids.shape[0], batch_size):
        yield input_ids[s:s + batch_size]


def compute_context(dtype: str, where: nn.Module | str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on the device type (cpu / cuda) of ``where`` (a model or a device)
    for ``dtype="bfloat16"``, else a no-op: the one autocast helper of every phase."""
    if dtype == "bfloat16":
        device = model_device(where) if isinstance(where, nn.Module) else torch.device(where)
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


@torch.inference_mode()
def mean_nll(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, dtype: str = "bfloat16",
             progress: bool = False, row_nll: list[float] | None = None) -> float:
    """Mean next-token negative log-likelihood (nats/token); log-softmax in float32.

    ``row_nll``, when given, receives each row's own mean NLL, in order (evaluation reports per-window NLLs).

    The LM head runs one sequence at a time, so the logits never exceed T x vocab floats.
    """
    arch = arch_of(model)
    input_ids = check_input_ids(input_ids)
    body = arch.backbone()
    total, count = 0.0, 0
    n_batches = math.ceil(input_ids.shape[0] / batch_size)
    device = model_device(model)
    with compute_context(dtype, device):
        for ids in tqdm(iter_batches(input_ids, batch_size), total=n_batches, desc="nll",
                        disable=not progress, leave=False):
            ids = ids.to(device)
            h = body(input_ids=ids, use_cache=False).last_hidden_state
            for row in range(ids.shape[0]):
                logits = arch.logits(h[row, :-1]).float()  # the model's own head path (Gemma 2 soft-caps)
                row_sum = F.cross_entropy(logits, ids[row, 1:], reduction="sum").item()
                total += row_sum
                count += ids.shape[1] - 1
                if row_nll is not None:
                    row_nll.append(row_sum / (ids.shape[1] - 1))
    return total / count
