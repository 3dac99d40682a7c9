"""Perplexity under explicitly labelled protocols.

Every result carries a ``protocol`` string, because PPL numbers are only comparable under the
same text, tokenisation, window length and stride::

    PPL = exp( sum_{w, t} -log p(x_{w,t} | x_{w,<t}) / (W * (T - 1)) )

over ``W`` windows of ``T`` tokens; the first token of each window has no context and is not
predicted, so ``W * (T - 1)`` tokens are scored. The NLL is :func:`flexigpt.compress.importance.mean_nll`
(bf16 autocast matmuls on CPU when ``dtype="bfloat16"``, float32 log-softmax).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexigpt.config import check_int
from flexigpt.data.packing import bos_prefix, with_prefix
from flexigpt.errors import FlexiError
from flexigpt.model.arch import arch_of
from flexigpt.model.forward import check_dtype, check_input_ids, mean_nll

WIKITEXT2_FILE = "wikitext2/test.jsonl"
WIKITEXT2_JOIN = "\n\n"
WIKITEXT2_PROTOCOL = (r"wikitext2-raw test, rows joined by \n\n, non-overlapping {window}-token windows, "
                      "last partial dropped")


def wikitext2_file(data_dir: str | Path, param: str = "data.dir") -> Path:
    """Path of ``wikitext2/test.jsonl`` under ``data_dir`` (a clear error if it is missing)."""
    path = Path(data_dir).expanduser() / WIKITEXT2_FILE
    if not path.is_file():
        raise FlexiError(param, f"the WikiText-2 test file {path.resolve()} does not exist",
                         "point params `data.dir` at the offline data folder (see SOURCES.md)")
    return path


def load_wikitext2_text(data_dir: str | Path, param: str = "data.dir") -> str:
    """WikiText-2 raw test: the ``text`` of every row of ``wikitext2/test.jsonl`` joined by "\\n\\n"."""
    path = wikitext2_file(data_dir, param)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f if line.strip()]
    return WIKITEXT2_JOIN.join(rows)


def tokenize_once(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(ids: torch.Tensor, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[N, window]`` windows of a 1-D id tensor; the last partial window is dropped.

    ``N = floor(len / window)`` (at most ``max_windows``); window ``i`` is ``ids[i*window:(i+1)*window]``.
    """
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * window].reshape(n, window)


def check_window(model: nn.Module, window: Any, param: str = "evaluate.ppl_window") -> int:
    """A window of >= 2 tokens that the model's positions can hold."""
    w = check_int(param, window, min=2)
    limit = arch_of(model).max_positions
    if limit is not None and w > limit:
        raise FlexiError(param, f"{w} tokens exceeds the model's {limit} positions", f"set `{param}` to at most {limit}")
    return w


def _ppl_result(nll: float, windows: torch.Tensor, protocol: str, window_nll: list[float]) -> dict[str, Any]:
    n, t = windows.shape
    return {"ppl": math.exp(nll), "nll": nll, "windows": int(n), "window": int(t), "tokens": int(n * t),
            "predicted_tokens": int(n * (t - 1)), "protocol": protocol, "window_nll": window_nll}


def wikitext2_token_ppl(model: nn.Module, tokenizer, data_dir: str | Path, window: int = 2048, *,
                        batch_size: int = 1, dtype: str = "bfloat16", max_windows: int | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Token-level WikiText-2 PPL: rows joined by "\\n\\n", tokenised once, non-overlapping windows.

    Returns ``{"ppl", "nll", "windows", "window", "tokens", "predicted_tokens", "total_tokens",
    "dropped_tokens", "protocol"}``; ``max_windows`` (first windows only) is stated in the protocol.
    """
    window = check_window(model, window)
    max_windows = check_int("evaluate.ppl_max_windows", max_windows, min=1, allow_none=True)
    check_int("evaluate.batch_size", batch_size, min=1)
    check_dtype(dtype, "evaluate.dtype")
    ids = tokenize_once(tokenizer, load_wikitext2_text(data_dir))
    prefix = bos_prefix(tokenizer)  # as lm-eval encodes: BOS first where the tokenizer adds one
    body = window - len(prefix)  # text tokens per window
    if body < 1:
        raise FlexiError("evaluate.ppl_window", f"{window} tokens leave no room for text after BOS", "use a larger window")
    windows = with_prefix(cut_windows(ids, body, max_windows), prefix)
    if windows.shape[0] == 0:
        raise FlexiError("evaluate.ppl_window", f"the text has only {ids.numel()} tokens, less than one "
                         f"{window}-token window", "use a smaller window")
    protocol = WIKITEXT2_PROTOCOL.format(window=window)
    if prefix:
        protocol += f"; each window is BOS {prefix} + {body} text tokens"
    if max_windows is not None and windows.shape[0] < ids.numel() // body:
        protocol += f"; first {windows.shape[0]} of {ids.numel() // body} windows only"
    rows: list[float] = []
    nll = mean_nll(model, windows, batch_size=batch_size, dtype=dtype, progress=progress, row_nll=rows)
    out = _ppl_result(nll, windows, protocol, rows)
    out.update(total_tokens=int(ids.numel()), dropped_tokens=int(ids.numel() % body))
    return out


def heldout_ppl(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, dtype: str = "bfloat16",
                label: str = "heldout split", progress: bool = False) -> dict[str, Any]:
    """exp(mean next-token NLL) over pre-tokenised ``input_ids`` [N, T] (each row scored on its own)."""
    check_int("evaluate.batch_size", batch_size, min=1)
    check_dtype(dtype, "evaluate.dtype")
    ids = check_input_ids(input_ids)
    n, t = ids.shape
    rows: list[float] = []
    nll = mean_nll(model, ids, batch_size=batch_size, dtype=dtype, progress=progress, row_nll=rows)
    return _ppl_result(nll, ids, f"{label}: {n} pre-tokenised sequences of {t} tokens, each scored "
                                 f"independently ({t - 1} predictions per sequence)", rows)
