"""Build the compared model variants from a base model, a plan and params.

One place that maps params (``mode``, ``adapters.*``, ``norm.*``, ``extend.*``) to a
:class:`FlexiSpec`, used by the svd_init, training, evaluation stages and the benchmarks alike.

Roles per ``mode``:

============== ======================================= ==============================================
variant        ``mode: prune`` (default)               ``mode: extend``
============== ======================================= ==============================================
dense          the base model                          the base model (untouched)
shortgpt       pruned blocks dropped, no training      not applicable (skipped)
lora_baseline  ShortGPT+LoRA: LoRA on the kept blocks  base + LoRA on every block, rank matched to the
                                                       extension's trainable parameters
flexigpt       pruned blocks rebuilt weight-shared     blocks repeated weight-shared (paper §1.7)
============== ======================================= ==============================================
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import flexi_model as fm
from .config import Params
from .errors import FlexiError
from .plan import Plan

VARIANTS = ("dense", "shortgpt", "lora_baseline", "flexigpt")
MODES = ("prune", "extend")
LABELS = {"prune": {"dense": "dense", "shortgpt": "ShortGPT", "lora_baseline": "ShortGPT+LoRA", "flexigpt": "FlexiGPT"},
          "extend": {"dense": "base (untouched)", "lora_baseline": "base+LoRA (matched params)",
                     "flexigpt": "FlexiGPT extended"}}


def mode(p: Params) -> str:
    return p.str("mode", choices=list(MODES), default="prune")


def applicable(variant: str, p: Params) -> bool:
    """Whether ``variant`` exists in the current mode (ShortGPT has no meaning when extending)."""
    return variant in LABELS[mode(p)]


def label(variant: str, p: Params) -> str:
    return LABELS[mode(p)].get(variant, variant)


def lora_settings(p: Params) -> fm.LoraSettings:
    targets = p.get("adapters.targets", ["all"])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise FlexiError("adapters.targets", f"must be a list of module names, got {targets!r}",
                         "write e.g. [all] or [q_proj, v_proj]")
    alpha = p.get("adapters.alpha", None)
    if alpha is not None:
        alpha = p.float("adapters.alpha", min=0.0, min_exclusive=True)
    init = p.str("adapters.init", choices=sorted(fm.INIT_STRATEGIES))
    return fm.LoraSettings(rank=p.int("adapters.rank", min=1), alpha=alpha, targets=targets, init=init)


def extension_spec(p: Params, num_blocks: int) -> fm.FlexiSpec:
    """``mode: extend``: the repeat layout from ``extend.*`` (validated against ``num_blocks``)."""
    pattern = p.str("extend.pattern", choices=["block", "sequential"])
    return fm.extend_spec(num_blocks, p.int("extend.start"), p.int("extend.end"), pattern,
                          p.int("extend.repeats"), lora_settings(p),
                          gamma_init=p.float("norm.gamma_init", min=0.0),
                          target_depth=p.int("extend.target_depth", allow_none=True, default=None))


def flexigpt_spec(p: Params, plan: Plan | None, num_blocks: int | None = None) -> fm.FlexiSpec:
    """The FlexiGPT model of the current mode: pruned-and-rebuilt (needs ``plan``) or extended."""
    if mode(p) == "extend":
        return extension_spec(p, num_blocks if num_blocks is not None else plan.num_blocks)
    return fm.prune_spec(plan.num_blocks, plan.base, lora_settings(p),
                         output_norm=p.bool("norm.enabled"),
                         gamma_init=p.float("norm.gamma_init", min=0.0),
                         lora_on_kept=p.bool("adapters.lora_on_kept", default=False))


def matched_rank(p: Params, num_blocks: int) -> int:
    """LoRA rank for the extend-mode baseline: LoRA on all ``L`` blocks with (about) as many
    parameters as the extension's adapters, ``r_b = max(1, round(r * n_repeats / L))``.

    LoRA parameters are linear in the rank and every block has the same linears, so equal
    ``rank x blocks`` means equal adapter parameters (the extension's output-norm γ, 2d per
    repeat, is not matched: under 0.1% of them).
    """
    spec = extension_spec(p, num_blocks)
    return max(1, round(spec.lora.rank * len(spec.lora_positions) / num_blocks))


def baseline_spec(p: Params, plan: Plan | None, num_blocks: int | None = None) -> fm.FlexiSpec:
    """``lora_baseline``: ShortGPT+LoRA (prune mode) or base + rank-matched LoRA (extend mode)."""
    lora = lora_settings(p)
    if mode(p) == "extend":
        L = num_blocks if num_blocks is not None else plan.num_blocks
        lora = fm.LoraSettings(rank=matched_rank(p, L), alpha=None, targets=lora.targets, init="zeros")
        return fm.shortgpt_spec(L, [], lora)
    return fm.shortgpt_spec(plan.num_blocks, plan.pruned, lora)


def spec_for(variant: str, p: Params, plan: Plan | None, num_blocks: int | None = None) -> fm.FlexiSpec | None:
    """The spec of ``variant`` in the current mode (None for the dense model)."""
    if variant not in VARIANTS:
        raise FlexiError("variant", f"unknown variant {variant!r}", f"use one of {list(VARIANTS)}")
    if not applicable(variant, p):
        raise FlexiError("variant", f"{variant!r} does not exist in mode {mode(p)!r}",
                         f"use one of {sorted(LABELS[mode(p)])}")
    if variant == "dense":
        return None
    if variant == "shortgpt":
        return fm.shortgpt_spec(plan.num_blocks, plan.pruned)
    if variant == "lora_baseline":
        return baseline_spec(p, plan, num_blocks)
    return flexigpt_spec(p, plan, num_blocks)


def build_variant(base: nn.Module, variant: str, p: Params, plan: Plan | None, *, copy_base: bool = True) -> nn.Module:
    """A fresh model of ``variant`` (the base is deep-copied unless ``copy_base`` is False).

    Seeded from params ``seed`` first: PEFT draws every zero-init adapter's A matrix from torch's
    global generator, so an unseeded build gives other weights on every run.
    """
    spec = spec_for(variant, p, plan, fm.get_adapter(base).num_blocks)
    draws = spec is not None and bool(spec.lora_positions)  # only adapters draw random numbers
    seed = p.int("seed", min=0) if draws else None
    model = copy.deepcopy(base) if copy_base else base
    if spec is not None:
        if seed is not None:
            torch.manual_seed(seed)
        fm.build(model, spec)
    return model
