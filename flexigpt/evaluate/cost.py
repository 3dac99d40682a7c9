"""Cost accounting per model variant: parameters stored vs. executed, FLOPs per token, latency.

Counts (for a FlexiGPT / ShortGPT / extended / dense model):

* ``stored_params``: every tensor once, however many positions share it (what is on disk).
* ``total_params``: block parameters counted once per *position* (as if unshared), plus the
  non-block parameters once (tied embedding / LM head counted once). Dense: = stored.
* ``adapter_params``: LoRA A/B and FlexiGPT output-norm γ.
* ``block_executions``: blocks run per token = number of positions.
* ``flops_per_token`` (forward, per token, short-context estimate)::

      FLOPs/token = 2 * ( sum_{positions p} |params of block p|      # linears, norms, LoRA A and B, γ
                          + |non-block params except embedding lookups|  # final norm, LM head )

  A ``y = xWᵀ`` with ``W`` of ``m x n`` costs ``2mn`` FLOPs per token (multiply + add), and an
  unmerged LoRA branch ``x Aᵀ Bᵀ`` costs ``2r(n + m)`` = 2 x its parameter count, so "2 x params
  touched" covers both. Embedding lookups (token and learned positional tables) are gathers and
  excluded; a head tied to the embeddings is still a matmul and is counted. The attention-score
  term (``QKᵀ`` and ``AV``: ``4 * d_attn * ctx`` per block per token for context ``ctx``) is
  excluded unless ``context`` is given. Elementwise work (activations, norms' arithmetic beyond
  their weights, RoPE, residual adds) is ignored.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from flexigpt.model.arch import arch_of
from flexigpt.config import check_int
from flexigpt.errors import FlexiError
from flexigpt.model.flexi import adapter_params, unique_params
from flexigpt.model.forward import check_dtype, compute_context, model_device


@dataclass
class Cost:
    """Parameter and compute accounting of one model variant."""

    stored_params: int
    total_params: int
    adapter_params: int
    block_executions: int
    flops_per_token: int
    embedding_params: int     # lookup tables, excluded from FLOPs
    attention_context: int    # ctx used for the attention-score term (0 = excluded)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _non_block_modules(model: nn.Module, blocks_path: str):
    """Modules outside the block list (with their own, non-recursive parameters)."""
    for name, mod in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        yield mod


def count_cost(model: nn.Module, *, context: int = 0) -> Cost:
    """Stored / total / adapter params, block executions and FLOPs per token (see module docstring)."""
    context = check_int("cost.context", context, min=0)
    arch = arch_of(model)
    blocks = list(arch.blocks())
    block_param = [_numel(b.parameters()) for b in blocks]
    in_blocks = {p.data_ptr() for b in blocks for p in b.parameters()}
    seen: set[int] = set()
    non_block = embed = touched_non_block = 0
    lookup_ptrs = {p.data_ptr() for m in _non_block_modules(model, arch.blocks_path)
                   if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    for mod in _non_block_modules(model, arch.blocks_path):
        for p in mod.parameters(recurse=False):
            if p.data_ptr() in in_blocks:
                continue
            if not isinstance(mod, nn.Embedding):
                touched_non_block += p.numel()   # e.g. a tied LM head: counted as a matmul
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            non_block += p.numel()
            if p.data_ptr() in lookup_ptrs:
                embed += p.numel()
    attn = 4 * arch.attention_width * context * len(blocks)
    return Cost(stored_params=unique_params(model), total_params=sum(block_param) + non_block,
                adapter_params=adapter_params(model), block_executions=len(blocks),
                flops_per_token=2 * (sum(block_param) + touched_non_block) + attn,
                embedding_params=embed, attention_context=context)


@torch.inference_mode()
def forward_latency(model: nn.Module, batch: torch.Tensor, *, repeats: int = 5, dtype: str = "bfloat16",
                    warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of a no-grad forward (logits included, no KV cache) on the same batch.

    Returns ``{"median_s", "min_s", "max_s", "repeats", "tokens"}``; compare variants relative to dense.
    """
    repeats = check_int("cost.repeats", repeats, min=1)
    warmup = check_int("cost.warmup", warmup, min=0)
    check_dtype(dtype, "cost.dtype")
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.is_floating_point() or batch.numel() == 0:
        raise FlexiError("cost.batch", "must be a non-empty integer tensor [B, T] of token ids",
                         "pass e.g. the first rows of the heldout split")
    arch_of(model)  # supported family
    times = []
    batch = batch.to(model_device(model))
    with compute_context(dtype, model):
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats, "tokens": int(batch.numel())}
