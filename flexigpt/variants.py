"""Build the compared model variants from a base model, a plan and params.

One place that maps params (``adapters.*``, ``norm.*``) to a :class:`FlexiSpec`, used by the
svd_init, training and evaluation stages alike.
"""
from __future__ import annotations

import copy

from torch import nn

from . import flexi_model as fm
from .config import Params
from .errors import FlexiError
from .plan import Plan

VARIANTS = ("dense", "shortgpt", "shortgpt_lora", "flexigpt")


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


def flexigpt_spec(p: Params, plan: Plan) -> fm.FlexiSpec:
    return fm.prune_spec(plan.num_blocks, plan.base, lora_settings(p),
                         output_norm=p.bool("norm.enabled"),
                         gamma_init=p.float("norm.gamma_init", min=0.0),
                         lora_on_kept=p.bool("adapters.lora_on_kept", default=False))


def spec_for(variant: str, p: Params, plan: Plan) -> fm.FlexiSpec | None:
    """The spec of ``variant`` (None for the dense model)."""
    if variant == "dense":
        return None
    if variant == "shortgpt":
        return fm.shortgpt_spec(plan.num_blocks, plan.pruned)
    if variant == "shortgpt_lora":
        return fm.shortgpt_spec(plan.num_blocks, plan.pruned, lora_settings(p))
    if variant == "flexigpt":
        return flexigpt_spec(p, plan)
    raise FlexiError("variant", f"unknown variant {variant!r}", f"use one of {list(VARIANTS)}")


def build_variant(base: nn.Module, variant: str, p: Params, plan: Plan, *, copy_base: bool = True) -> nn.Module:
    """A fresh model of ``variant`` (the base is deep-copied unless ``copy_base`` is False)."""
    spec = spec_for(variant, p, plan)
    model = copy.deepcopy(base) if copy_base else base
    if spec is not None:
        fm.build(model, spec)
    return model
