"""The compared model variants: one registry, read by the stages, the comparison table and the benchmarks.

A :class:`Variant` says what a variant is called in each mode, whether it trains, where its
training starts and how its :class:`~flexigpt.model.flexi.FlexiSpec` is built from a
:class:`Recipe` (params ``mode``, ``train.seed``, ``adapters.*``, ``norm.*``, ``extend.*``) and a plan.

============== ======================================= ==============================================
variant        ``mode: prune`` (default)               ``mode: extend``
============== ======================================= ==============================================
dense          the base model                          the base model (untouched)
shortgpt       pruned blocks dropped, no training      not applicable (skipped)
lora_baseline  ShortGPT+LoRA: LoRA on the kept blocks  base + LoRA on every block, rank matched to the
                                                       extension's trainable parameters
flexigpt       pruned blocks rebuilt weight-shared     blocks repeated weight-shared (paper §1.7)
============== ======================================= ==============================================

Adding a variant: register it here, give it a folder under ``evaluate.variants`` in params.yaml,
and (if it trains) a ``train_<name>`` stage in dvc.yaml.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexigpt.compress.plan import Plan
from flexigpt.config import Params, Settings, setting
from flexigpt.devices import place, resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.model import checkpoint
from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of, facts_of

MODES = ("prune", "extend")


# -- the recipe: what a variant is built from -----------------------------------------------------

@dataclass(frozen=True)
class AdapterSettings(Settings):
    """LoRA on the weight-shared linears (params ``adapters.*``; paper Eqs. 7-8, via PEFT)."""

    SECTION = "adapters"
    rank: int = setting(32, "LoRA rank r", min=1)
    alpha: float | None = setting(None, "LoRA alpha; null = rank (PEFT scaling alpha/r = 1)",
                                  type=float, min=0.0, min_exclusive=True)
    targets: list = setting(["all"], "leaf names of adapted linears; [all] = every adaptable linear")
    init: str = setting("svd_diff", "adapter init strategy", choices=lambda: tuple(fm.INIT_STRATEGIES))
    lora_on_kept: bool = setting(True, "also put zero-init LoRA (same rank) on every kept block")

    def check(self) -> None:
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise FlexiError("adapters.targets", f"must be a list of module names, got {self.targets!r}",
                             "write e.g. [all] or [q_proj, v_proj]")

    @property
    def lora(self) -> fm.LoraSettings:
        return fm.LoraSettings(rank=self.rank, alpha=self.alpha, targets=list(self.targets), init=self.init)


@dataclass(frozen=True)
class BaselineSettings(Settings):
    """The ShortGPT+LoRA baseline's adapters (params ``baseline.*``; only ``train_lora_baseline`` reads them)."""

    SECTION = "baseline"
    params_matched: bool = setting(False, "prune mode: raise the baseline's LoRA rank so its adapter parameters "
                                          "match FlexiGPT's (false = the same rank; extend mode always matches)")


@dataclass(frozen=True)
class NormSettings(Settings):
    """Output LayerNorm on replaced blocks' attention and MLP outputs (params ``norm.*``; paper Eq. 6)."""

    SECTION = "norm"
    enabled: bool = setting(True, "false = ablation without output normalisation")
    gamma_init: float = setting(1e-3, "initial γ: small, so a replaced block starts near identity", min=0.0)


@dataclass(frozen=True)
class ExtendSettings(Settings):
    """``mode: extend``: repeat blocks start..end with their own adapters and norms (params ``extend.*``)."""

    SECTION = "extend"
    start: int = setting(12, "first repeated block (inclusive, 0-based)", min=0)
    end: int = setting(17, "last repeated block (inclusive)", min=0)
    pattern: str = setting("block", "block (a,a,b,b) | sequential (a..b,a..b)", choices=("block", "sequential"))
    repeats: int = setting(2, "copies of each repeated block in the new model", min=1)
    target_depth: int | None = setting(None, "optional check: the depth you expect", type=int, min=1)


@dataclass(frozen=True)
class SvdInitSettings(Settings):
    """Start-PPL check of the svd_init stage (params ``svd_init.*``)."""

    SECTION = "svd_init"
    batch_size: int = setting(4, "heldout sequences per forward pass", min=1)
    eval_dtype: str = setting("auto", "auto | bfloat16 | float32", choices=("auto", "bfloat16", "float32"))


@dataclass(frozen=True)
class Recipe:
    """Everything a variant's structure depends on: mode, training seed (random adapter init), adapters, norms,
    extension."""

    mode: str = "prune"
    seed: int = 0
    adapters: AdapterSettings = field(default_factory=AdapterSettings)
    norm: NormSettings = field(default_factory=NormSettings)
    extend: ExtendSettings = field(default_factory=ExtendSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)

    @classmethod
    def from_params(cls, p: Params) -> "Recipe":
        return cls(mode=p.str("mode", choices=list(MODES), default="prune"), seed=p.int("train.seed", min=0, default=0),
                   adapters=AdapterSettings.from_params(p), norm=NormSettings.from_params(p),
                   extend=ExtendSettings.from_params(p), baseline=BaselineSettings.from_params(p))


def recipe(x: Recipe | Params) -> Recipe:
    """A :class:`Recipe`, built from params when given params."""
    return x if isinstance(x, Recipe) else Recipe.from_params(x)


# -- specs ------------------------------------------------------------------------------------------

def extension_spec(r: Recipe | Params, num_blocks: int) -> fm.FlexiSpec:
    """``mode: extend``: the repeat layout (validated against ``num_blocks``)."""
    r = recipe(r)
    e = r.extend
    return fm.extend_spec(num_blocks, e.start, e.end, e.pattern, e.repeats, r.adapters.lora,
                          gamma_init=r.norm.gamma_init, target_depth=e.target_depth)


def matched_rank(r: Recipe | Params, num_blocks: int) -> int:
    """LoRA rank for the extend-mode baseline: LoRA on all ``L`` blocks with (about) as many
    parameters as the extension's adapters, ``r_b = max(1, round(r * n_repeats / L))``.

    LoRA parameters are linear in the rank and every block has the same linears, so equal
    ``rank x blocks`` means equal adapter parameters (the extension's output-norm γ, 2d per
    repeat, is not matched: under 0.1% of them).
    """
    spec = extension_spec(r, num_blocks)
    return max(1, round(spec.lora.rank * len(spec.lora_positions) / num_blocks))


def matched_prune_rank(r: Recipe | Params, plan: Plan) -> int:
    """ShortGPT+LoRA rank with (about) FlexiGPT's adapter parameters: ``max(1, round(r * n_flexi / n_kept))``.

    FlexiGPT adapts ``n_flexi`` positions (the replaced ones, plus the kept ones with ``lora_on_kept``),
    the baseline the ``n_kept`` kept blocks; every block has the same linears, so equal ``rank x blocks``
    is equal LoRA parameters (FlexiGPT's output-norm γ, 2d per replaced block, is not matched: < 0.1%).
    """
    r = recipe(r)
    n_flexi = len(_flexigpt_spec(r, plan, plan.num_blocks).lora_positions)
    return max(1, round(r.adapters.rank * n_flexi / (plan.num_blocks - len(plan.pruned))))


def _need_plan(plan: Plan | None, variant: str) -> Plan:
    if plan is None:
        raise FlexiError("paths.plan", f"{variant} in mode prune needs a pruning plan", "run `dvc repro prune` first")
    return plan


def _dense_spec(r: Recipe, plan: Plan | None, L: int) -> fm.FlexiSpec | None:
    return None


def _shortgpt_spec(r: Recipe, plan: Plan | None, L: int) -> fm.FlexiSpec:
    plan = _need_plan(plan, "shortgpt")
    return fm.shortgpt_spec(plan.num_blocks, plan.pruned)


def _baseline_spec(r: Recipe, plan: Plan | None, L: int) -> fm.FlexiSpec:
    """ShortGPT+LoRA (prune mode) or base + rank-matched LoRA (extend mode)."""
    lora = r.adapters.lora
    if r.mode == "extend":
        lora = fm.LoraSettings(rank=matched_rank(r, L), alpha=None, targets=lora.targets, init="zeros")
        return fm.shortgpt_spec(L, [], lora)
    plan = _need_plan(plan, "lora_baseline")
    if r.baseline.params_matched:
        lora = fm.LoraSettings(rank=matched_prune_rank(r, plan), alpha=lora.alpha, targets=lora.targets, init=lora.init)
    return fm.shortgpt_spec(plan.num_blocks, plan.pruned, lora)


def _flexigpt_spec(r: Recipe, plan: Plan | None, L: int) -> fm.FlexiSpec:
    """Pruned-and-rebuilt (prune mode) or extended (extend mode)."""
    if r.mode == "extend":
        return extension_spec(r, L)
    plan = _need_plan(plan, "flexigpt")
    return fm.prune_spec(plan.num_blocks, plan.base, r.adapters.lora, output_norm=r.norm.enabled,
                         gamma_init=r.norm.gamma_init, lora_on_kept=r.adapters.lora_on_kept)


# -- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One compared model."""

    name: str
    labels: dict[str, str]  # mode -> label in tables; a mode without a label = not applicable there
    trainable: bool         # has a train_<name> stage
    train_from: str | None  # "init": the svd_init artifact; "build": built from base (+ plan)
    spec: Callable[[Recipe, Plan | None, int], fm.FlexiSpec | None]
    help: str = ""

    def applicable(self, mode: str) -> bool:
        return mode in self.labels


VARIANTS: dict[str, Variant] = {}


def register(v: Variant) -> Variant:
    VARIANTS[v.name] = v
    return v


register(Variant("dense", {"prune": "dense", "extend": "base (untouched)"}, False, None, _dense_spec,
                 "the base model"))
register(Variant("shortgpt", {"prune": "ShortGPT"}, False, None, _shortgpt_spec,
                 "the plan's pruned blocks removed, no training"))
register(Variant("lora_baseline", {"prune": "ShortGPT+LoRA", "extend": "base+LoRA (matched params)"}, True,
                 "build", _baseline_spec, "ShortGPT+LoRA, or base + rank-matched LoRA when extending"))
register(Variant("flexigpt", {"prune": "FlexiGPT", "extend": "FlexiGPT extended"}, True, "init", _flexigpt_spec,
                 "pruned blocks rebuilt weight-shared (or blocks repeated), own LoRA and output norms"))


def get(name: str) -> Variant:
    if name not in VARIANTS:
        raise FlexiError("variant", f"unknown variant {name!r}", f"use one of {list(VARIANTS)}")
    return VARIANTS[name]


def trainable() -> list[str]:
    return [n for n, v in VARIANTS.items() if v.trainable]


def applicable(variant: str, r: Recipe | Params) -> bool:
    """Whether ``variant`` exists in the current mode (ShortGPT has no meaning when extending)."""
    return get(variant).applicable(recipe(r).mode)


def label(variant: str, r: Recipe | Params) -> str:
    return get(variant).labels.get(recipe(r).mode, variant)


def mode(r: Recipe | Params) -> str:
    return recipe(r).mode


def spec_for(variant: str, r: Recipe | Params, plan: Plan | None, num_blocks: int | None = None) -> fm.FlexiSpec | None:
    """The spec of ``variant`` in the current mode (None for the dense model)."""
    r, v = recipe(r), get(variant)
    if not v.applicable(r.mode):
        raise FlexiError("variant", f"{variant!r} does not exist in mode {r.mode!r}",
                         f"use one of {[n for n, x in VARIANTS.items() if x.applicable(r.mode)]}")
    L = num_blocks if num_blocks is not None else _need_plan(plan, variant).num_blocks
    return v.spec(r, plan, L)


def flexigpt_spec(r: Recipe | Params, plan: Plan | None, num_blocks: int | None = None) -> fm.FlexiSpec:
    return spec_for("flexigpt", r, plan, num_blocks)


def build_variant(base: nn.Module, variant: str, r: Recipe | Params, plan: Plan | None, *,
                  copy_base: bool = True) -> nn.Module:
    """A fresh model of ``variant`` (the base is deep-copied unless ``copy_base`` is False).

    Seeded from ``train.seed`` first: PEFT draws every zero-init adapter's A matrix from torch's
    global generator, so an unseeded build gives other weights on every run.
    """
    r = recipe(r)
    spec = spec_for(variant, r, plan, arch_of(base).num_blocks)
    model = copy.deepcopy(base) if copy_base else base
    if spec is not None:
        if spec.lora_positions:  # only adapters draw random numbers
            torch.manual_seed(r.seed)
        fm.build(model, spec)
    return model


# -- loading, for the stages -------------------------------------------------------------------------

def load_plan(r: Recipe, plan_dir: str | os.PathLike) -> Plan | None:
    """The pruning plan in prune mode; None when extending (an extension needs no plan)."""
    return Plan.load(plan_dir) if r.mode == "prune" else None


def load_variant(variant: str, path: str | os.PathLike, base_model: str | os.PathLike, r: Recipe,
                 plan_dir: str | os.PathLike | None = None):
    """(model, tokenizer) of an evaluated variant from its folder: compact flexigpt, plan (ShortGPT) or plain HF."""
    from flexigpt.model.importer import load_plain

    path, base_model = Path(path), Path(base_model)
    base, tok = load_plain(base_model)
    if (path / checkpoint.MANIFEST).is_file():
        return checkpoint.load(path), tok
    if (path / "plan.json").is_file():
        return build_variant(base, variant, r, Plan.load(path), copy_base=False), tok
    if (path / "config.json").is_file():
        return (base, tok) if path.resolve() == base_model.resolve() else load_plain(path)
    raise FlexiError(f"evaluate.variants.{variant}", f"{path} is not a model, plan or compact folder",
                     "point it at artifacts/base_model, artifacts/plan or a compact folder (artifacts/trained/...)")


def check_folder(variant: str, path: str | os.PathLike) -> Path:
    """An evaluated variant's folder holds a model, a plan or a compact checkpoint (checked before any load)."""
    p = Path(path)
    param = f"evaluate.variants.{variant}"
    if not p.is_dir():
        raise FlexiError(param, f"{p} does not exist", "run the stage that writes it (see `dvc dag`), or fix the path")
    if not any((p / f).is_file() for f in (checkpoint.MANIFEST, "plan.json", "config.json")):
        raise FlexiError(param, f"{p} holds no model ({checkpoint.MANIFEST}, plan.json or config.json)",
                         "point it at artifacts/base_model, artifacts/plan or a compact folder (artifacts/trained/...)")
    return p


def training_start(variant: str, r: Recipe, base_model: str | os.PathLike, plan_dir: str | os.PathLike,
                   init_dir: str | os.PathLike):
    """(model to train, base model, tokenizer): from the svd_init artifact or built from the base (+ plan)."""
    from flexigpt.model.importer import load_plain

    v = get(variant)
    if not v.trainable:
        raise FlexiError("variant", f"{variant!r} does not train", f"train one of {trainable()}")
    base, tok = load_plain(Path(base_model))
    if v.train_from == "init":
        return checkpoint.load(init_dir), base, tok
    return build_variant(base, variant, r, load_plan(r, plan_dir)), base, tok


def check_training(variant: str, r: Recipe, base_model: str | os.PathLike, plan_dir: str | os.PathLike) -> None:
    """Validate the variant's recipe against the model's depth, before any weights load."""
    if get(variant).train_from == "build" or r.mode == "extend":
        spec_for(variant, r, load_plan(r, plan_dir), facts_of(base_model).num_blocks)


def init_flexigpt(r: Recipe, s: SvdInitSettings, base_model: str | os.PathLike, plan_dir: str | os.PathLike,
                  heldout: torch.Tensor, out: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """The svd_init step: build FlexiGPT at init, save it (compact) to ``out``, and measure start PPLs.

    Prune mode: dense / ShortGPT / FlexiGPT heldout PPL; extend mode: base and extended model (equal
    up to the small γ), the new depth and the parameter overhead.
    """
    from flexigpt.model.forward import mean_nll
    from flexigpt.model.importer import load_plain
    from flexigpt.model.selftest import self_test

    plan = load_plan(r, plan_dir)
    num_blocks = facts_of(base_model).num_blocks
    spec = flexigpt_spec(r, plan, num_blocks)  # validates adapters/norm/extend before loading weights
    dtype = resolve_dtype(s.eval_dtype, device)
    base, tok = load_plain(Path(base_model))
    fm.validate_spec(arch_of(base), spec)
    self_test(base)  # a wrong family seam fails here, loudly, not as a quietly worse model
    metrics: dict[str, Any] = {"mode": r.mode, "depth_before": num_blocks, "depth_after": len(spec.sources)}
    sizes: dict[str, int] = {}
    for name in ("dense", "shortgpt", "flexigpt"):
        if not applicable(name, r):
            continue
        model = place(build_variant(base, name, r, plan), device)
        nll = mean_nll(model, heldout, batch_size=s.batch_size, dtype=dtype, progress=True)
        metrics[name] = {"heldout_ppl": math.exp(nll), "stored_params": fm.unique_params(model),
                         "adapter_params": fm.adapter_params(model)}
        if name == "flexigpt":
            sizes = checkpoint.save(model.cpu(), out, tokenizer=tok)
        del model
    dense_bytes = checkpoint.dir_bytes(base_model)
    metrics["disk"] = {"dense_bytes": dense_bytes, "compact_bytes": sizes["base_bytes"] + sizes["adapter_bytes"],
                       **sizes}
    metrics["disk"]["compact_vs_dense"] = metrics["disk"]["compact_bytes"] / dense_bytes
    ref = "shortgpt" if r.mode == "prune" else "dense"
    metrics[f"start_ppl_vs_{ref}"] = metrics["flexigpt"]["heldout_ppl"] / metrics[ref]["heldout_ppl"]
    metrics["param_overhead_vs_dense"] = metrics["flexigpt"]["stored_params"] / metrics["dense"]["stored_params"] - 1
    metrics["heldout_tokens"] = int(heldout.numel())
    return metrics
