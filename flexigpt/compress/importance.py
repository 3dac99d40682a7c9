"""Block importance scores: which blocks can be pruned (paper §1.2, Eq. 1).

Three methods, all "low score = prunable":

* ``block_influence`` (ShortGPT / FlexiGPT Eq. 1)::

      BI_i = 1 - mean_t cos(X_{i,t}, X_{i+1,t})

  where ``X_i`` is block ``i``'s input hidden state and ``X_{i+1}`` its output, and the mean runs
  over every token ``t`` of every calibration sequence.
* ``angular``: the single-block angular distance of Gromov et al.,
  ``mean_t arccos(cos(X_{i,t}, X_{i+1,t})) / pi`` (in [0, 1]).
* ``drop_nll``: remove block ``i`` alone and measure the mean next-token NLL on the calibration
  tokens; the score is ``NLL(without i) - NLL(dense)``.

The two cosine methods read each block's input with a forward pre-hook and its output with a
forward hook (a tensor, or a tuple whose ``[0]`` is the hidden state), and keep only running
sums per block, so memory does not grow with the number of batches. They deliberately do not
use ``output_hidden_states``: its last entry comes after the final norm, which would score the
last block far too high (about 0.88 instead of 0.25 on SmolLM2).

Matmuls run under ``torch.autocast(bfloat16)`` on the model's device when ``dtype="bfloat16"``; the cosine
and NLL arithmetic is done in float32 and the running sums in float64.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexigpt.config import Settings, setting
from flexigpt.devices import resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.model.arch import Arch, arch_of
from flexigpt.model.forward import check_dtype, check_input_ids, compute_context, iter_batches, mean_nll, model_device
from flexigpt.model.stream import StreamedModel, StreamSettings, hidden_of

Scorable = nn.Module | StreamedModel  # a model in memory, or one read block by block from its shards


@dataclass
class ImportanceResult:
    """Per-block scores (low = prunable) and how they were obtained."""

    scores: list[float]
    method: str
    tokens: int      # input tokens processed (sequences x seq_len)
    sequences: int
    dtype: str

    @property
    def num_blocks(self) -> int:
        return len(self.scores)

    def ranking(self) -> list[int]:
        """Block indices, lowest score first (ties: lower index first)."""
        return sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_blocks"] = self.num_blocks
        d["ranking"] = self.ranking()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImportanceResult":
        return cls(scores=[float(s) for s in d["scores"]], method=str(d["method"]), tokens=int(d["tokens"]),
                   sequences=int(d["sequences"]), dtype=str(d.get("dtype", "float32")))


# -- validation -------------------------------------------------------------------------------
def check_method(method: str, param: str = "importance.method") -> str:
    if method not in METHODS:
        raise FlexiError(param, f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    return method


class CosineSums:
    """Running per-block sums over tokens: sum cos, sum arccos(cos)/pi, token count."""

    def __init__(self, num_blocks: int) -> None:
        self.cos = torch.zeros(num_blocks, dtype=torch.float64)
        self.ang = torch.zeros(num_blocks, dtype=torch.float64)
        self.count = torch.zeros(num_blocks, dtype=torch.float64)

    def add(self, i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """Accumulate cos(x_in_t, x_out_t) over all tokens t of one batch (float32 maths)."""
        c = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8).flatten()
        self.cos[i] += c.sum(dtype=torch.float64).cpu()  # the sums live on the CPU, the model may not
        self.ang[i] += (torch.arccos(c.clamp(-1.0, 1.0)) / math.pi).sum(dtype=torch.float64).cpu()
        self.count[i] += c.numel()

    def block_influence(self) -> list[float]:
        """BI_i = 1 - mean_t cos."""
        return (1.0 - self.cos / self.count).tolist()

    def angular(self) -> list[float]:
        """mean_t arccos(cos) / pi."""
        return (self.ang / self.count).tolist()


@contextlib.contextmanager
def cosine_hooks(arch: Arch, sums: CosineSums) -> Iterator[None]:
    """Hook every block: the pre-hook keeps its input, the forward hook adds cos(input, output).

    Only the input of the block currently running is held (released as soon as it is used).
    """
    held: dict[int, torch.Tensor] = {}
    handles = []

    def pre(i):
        def hook(_mod, args, kwargs):
            held[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i):
        def hook(_mod, _args, _kwargs, output):
            sums.add(i, held.pop(i), hidden_of(output))
        return hook

    try:
        for i, block in enumerate(arch.blocks()):
            handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(block.register_forward_hook(post(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        held.clear()


# -- methods ------------------------------------------------------------------------------------
@torch.inference_mode()
def cosine_scores(model: Scorable, input_ids: torch.Tensor, *, batch_size: int = 8, dtype: str = "bfloat16",
                  progress: bool = True) -> CosineSums:
    """Stream ``input_ids`` through the model's blocks and return the per-block cosine sums.

    A :class:`StreamedModel` runs layer-wise (one block in memory); the sums are the same bits.
    """
    input_ids = check_input_ids(input_ids)
    if isinstance(model, StreamedModel):
        sums = CosineSums(model.num_blocks)
        model.run(input_ids, batch_size=batch_size, dtype=dtype, on_block=sums.add, progress=progress,
                  desc="block cosines")
        return sums
    arch = arch_of(model)
    sums = CosineSums(arch.num_blocks)
    body = arch.backbone()
    n_batches = math.ceil(input_ids.shape[0] / batch_size)
    device = model_device(model)
    with cosine_hooks(arch, sums), compute_context(dtype, device):
        for ids in tqdm(iter_batches(input_ids, batch_size), total=n_batches, desc="block cosines",
                        disable=not progress, leave=False):
            body(input_ids=ids.to(device), use_cache=False)
    return sums


@torch.inference_mode()
def _streamed_nll(model: StreamedModel, input_ids: torch.Tensor, order: list[int], *, batch_size: int,
                  dtype: str) -> float:
    """:func:`~flexigpt.model.forward.mean_nll` of the blocks ``order``, run layer-wise (same arithmetic)."""
    hs = model.run(input_ids, batch_size=batch_size, dtype=dtype, order=order, progress=False)
    total, count = 0.0, 0
    with compute_context(dtype, model.device):
        for ids, h in zip(iter_batches(input_ids, batch_size), hs):
            ids = ids.to(model.device)
            h = model.finish(ids, h, dtype)
            for row in range(ids.shape[0]):
                logits = model.logits(h[row, :-1]).float()  # the model's own head path (Gemma 2 soft-caps)
                total += F.cross_entropy(logits, ids[row, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
    return total / count


def drop_nll_scores(model: Scorable, input_ids: torch.Tensor, *, batch_size: int = 8, dtype: str = "bfloat16",
                    progress: bool = True) -> list[float]:
    """score_i = NLL(model without block i) - NLL(dense model); the block list is always restored.

    A :class:`StreamedModel` makes one layer-wise pass per dropped block (each block read L times).
    """
    if isinstance(model, StreamedModel):
        every = list(range(model.num_blocks))
        dense = _streamed_nll(model, input_ids, every, batch_size=batch_size, dtype=dtype)
        return [_streamed_nll(model, input_ids, every[:i] + every[i + 1:], batch_size=batch_size, dtype=dtype) - dense
                for i in tqdm(every, desc="drop one block", disable=not progress, leave=False)]
    arch = arch_of(model)
    blocks = list(arch.blocks())
    dense = mean_nll(model, input_ids, batch_size=batch_size, dtype=dtype)
    scores = []
    try:
        for i in tqdm(range(len(blocks)), desc="drop one block", disable=not progress, leave=False):
            arch.set_blocks(blocks[:i] + blocks[i + 1:])
            scores.append(mean_nll(model, input_ids, batch_size=batch_size, dtype=dtype) - dense)
    finally:
        arch.set_blocks(blocks)
    return scores


def _block_influence(model: nn.Module, ids: torch.Tensor, **kw) -> list[float]:
    return cosine_scores(model, ids, **kw).block_influence()


def _angular(model: nn.Module, ids: torch.Tensor, **kw) -> list[float]:
    return cosine_scores(model, ids, **kw).angular()


METHODS: dict[str, Callable[..., list[float]]] = {
    "block_influence": _block_influence,  # 1 - mean cos(in, out): paper Eq. 1
    "angular": _angular,                  # mean arccos(cos) / pi
    "drop_nll": drop_nll_scores,          # NLL rise when the block alone is removed
}
"""Importance methods by name: ``f(model, ids, batch_size=, dtype=, progress=) -> scores`` (low = prunable).
Add one here and it is a valid ``importance.method``."""


@dataclass(frozen=True)
class ImportanceSettings(Settings):
    """How blocks are scored (params ``importance.*``)."""

    SECTION = "importance"
    method: str = setting("block_influence", "scoring method (low score = prunable)", choices=lambda: tuple(METHODS))
    batch_size: int = setting(8, "calibration sequences per forward pass", min=1)
    dtype: str = setting("auto", "compute dtype: auto | bfloat16 | float32", choices=("auto", "bfloat16", "float32"))
    n_sequences: int | None = setting(None, "calibration sequences to score on (first N); null = all", type=int, min=1)


def score_blocks(model: Scorable, input_ids: torch.Tensor, *, method: str = "block_influence",
                 batch_size: int = 8, dtype: str = "bfloat16", progress: bool = True) -> ImportanceResult:
    """Score every block of ``model`` (in memory, or a :class:`StreamedModel`) on calibration ``input_ids``
    [N, T] (low score = prunable)."""
    check_method(method)
    check_dtype(dtype)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FlexiError("importance.batch_size", f"must be a whole number >= 1, got {batch_size!r}",
                         "set it to e.g. 8")
    input_ids = check_input_ids(input_ids)
    scores = METHODS[method](model, input_ids, batch_size=batch_size, dtype=dtype, progress=progress)
    return ImportanceResult(scores=[float(s) for s in scores], method=method, tokens=int(input_ids.numel()),
                            sequences=int(input_ids.shape[0]), dtype=dtype)


def score_model(s: ImportanceSettings, base_model: str | os.PathLike, data: str | os.PathLike,
                device: str = "cpu", stream: StreamSettings | None = None) -> tuple[ImportanceResult, dict[str, int]]:
    """Score the blocks of the model in ``base_model`` on the calibration split in ``data``, one block in
    memory at a time; returns the scores and the peak-memory estimate (bytes by part), checked first
    against ``stream.memory_limit_gb``."""
    from flexigpt.data.splits import load_split

    ids = load_split(data, "calibration")  # validated before the model loads
    if s.n_sequences is not None:
        if s.n_sequences > ids.shape[0]:
            raise FlexiError("importance.n_sequences", f"asks for {s.n_sequences} sequences but the calibration "
                             f"split has {ids.shape[0]}", f"set it to at most {ids.shape[0]}, or null for all")
        ids = ids[:s.n_sequences]
    model = StreamedModel(Path(base_model), device=device)
    limit = stream.memory_limit_gb if stream is not None else None
    estimate = model.check_memory(limit, tokens=ids.numel(), batch_tokens=min(s.batch_size, ids.shape[0]) * ids.shape[1])
    res = score_blocks(model, ids, method=s.method, batch_size=s.batch_size, dtype=resolve_dtype(s.dtype, device))
    return res, estimate
