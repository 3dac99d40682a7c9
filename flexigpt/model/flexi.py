"""The FlexiGPT model: weight-shared replacement blocks with their own LoRA adapters and output norms.

A :class:`FlexiSpec` is the whole recipe: ``sources[p]`` is the original block whose linear
weights position ``p`` uses; ``replaced`` positions are weight-shared copies that get their own
LoRA adapters and small-γ output norms (paper Eqs. 6-8). The same spec describes a pruned
FlexiGPT model, the ShortGPT baseline (``sources`` = kept blocks, nothing replaced) and an
extended model (a source repeated).

Why not PEFT's ``layer_replication``: it only knows a few module layouts (not OPT's
``decoder.layers``), ties *every* parameter of the copied block (pre-norms included) and builds
positions from index ranges. FlexiGPT keeps each pruned position where it was, keeps that
block's own pre-norm weights (tiny, and what makes a full-rank ``svd_diff`` init exact), and works
for any family behind :class:`~flexigpt.model.arch.Arch`. So we tie the linear weights
ourselves and let PEFT do what it does well: the LoRA layers (``inject_adapter_in_model``).
The output norm is not a LoRA feature at all, so it is our own module.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flexigpt.model.arch import Arch, arch_of
from flexigpt.errors import FlexiError

log = logging.getLogger(__name__)
ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """LoRA on the shared linears (PEFT)."""

    rank: int = field(default=32, metadata={"help": "LoRA rank r; SmolLM2 default 32 ~ paper's 256 at d=4096 (x576/4096)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (PEFT scaling alpha/r = 1)"})
    targets: list[str] = field(default_factory=lambda: ["all"],
                               metadata={"help": "leaf names of the linears that get adapters; ['all'] = every "
                                                 "projection (q,k,v,o,gate,up,down on Llama)"})
    init: str = field(default="svd_diff", metadata={"help": "adapter init strategy: svd_diff | zeros"})

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass
class FlexiSpec:
    """Serialisable recipe for a FlexiGPT / ShortGPT / extended model built from a base model."""

    sources: list[int] = field(metadata={"help": "position -> original block whose linear weights it uses"})
    replaced: list[int] = field(metadata={"help": "weight-shared positions with own adapters and output norms"})
    num_original_blocks: int = field(metadata={"help": "depth of the base model the spec applies to"})
    lora_positions: list[int] = field(default_factory=list, metadata={"help": "positions whose linears get LoRA"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    output_norm: bool = field(default=True, metadata={"help": "LayerNorm(γ) on replaced blocks' sublayer outputs (Eq. 6)"})
    gamma_init: float = field(default=1e-3, metadata={"help": "initial γ of the output norms (small: near-identity block)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "output-norm epsilon"})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlexiSpec":
        d = dict(d)
        d["lora"] = LoraSettings(**d.get("lora", {}))
        return cls(**d)


# -- constructors for the three model kinds ------------------------------------------------------

def prune_spec(num_blocks: int, base: dict[int, int], lora: LoraSettings, *, output_norm: bool = True,
               gamma_init: float = 1e-3, lora_on_kept: bool = False) -> FlexiSpec:
    """FlexiGPT: pruned position i keeps its place and shares block ``base[i]``'s weights."""
    sources = [base.get(i, i) for i in range(num_blocks)]
    replaced = sorted(base)
    lora_pos = list(range(num_blocks)) if lora_on_kept else replaced
    return FlexiSpec(sources, replaced, num_blocks, lora_pos, lora, output_norm, gamma_init)


def shortgpt_spec(num_blocks: int, pruned: list[int], lora: LoraSettings | None = None) -> FlexiSpec:
    """ShortGPT (blocks removed); with ``lora``, the ShortGPT+LoRA baseline (LoRA on every kept block)."""
    kept = [i for i in range(num_blocks) if i not in set(pruned)]
    lora = lora or LoraSettings(rank=1, targets=[])
    pos = list(range(len(kept))) if lora.targets else []
    return FlexiSpec(kept, [], num_blocks, pos, LoraSettings(**{**asdict(lora), "init": "zeros"}), False, 0.0)


# -- output normalisation (Eq. 6) -----------------------------------------------------------------

class OutputNorm(nn.Module):
    """h -> γ ⊙ (h - μ(h)) / σ(h), over the hidden dim; no β. Applied by a forward hook on the module
    whose output joins the residual (:attr:`Arch.attn_residual` / ``mlp_residual``):
    x + LN_γ(Attn(x)), x + LN_γ(MLP(x))."""

    def __init__(self, dim: int, gamma_init: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (F.layer_norm(h.float(), h.shape[-1:], eps=self.eps) * self.gamma.float()).to(h.dtype)

    def hook(self, module: nn.Module, args: tuple, out):
        # attention modules return (hidden, weights, ...): only the hidden state joins the residual
        return (self(out[0]), *out[1:]) if isinstance(out, tuple) else self(out)


NORM_ATTRS = {"attn": "flexi_attn_out_norm", "mlp": "flexi_mlp_out_norm"}


def attach_output_norms(arch: Arch, positions: list[int], gamma_init: float, eps: float) -> None:
    """Add an :class:`OutputNorm` to the attention and MLP outputs of each block in ``positions``."""
    blocks = arch.blocks()
    ref = next(arch.model.parameters())
    for p in positions:
        for kind, target in arch.residual_outputs(p).items():
            norm = OutputNorm(arch.hidden_size, gamma_init, eps).to(ref.device)
            setattr(blocks[p], NORM_ATTRS[kind], norm)
            target.register_forward_hook(norm.hook)


# -- adapter initialisation strategies (named, like PEFT's pissa_init) ----------------------------

def svd_diff_init(layer: nn.Module, diff: torch.Tensor, scaling: float) -> None:
    """Eqs. 7-8: W_i - W_j = U Σ Vᵀ; lora_B = U_r Σ_r / scaling (out x r), lora_A = V_rᵀ (r x in),
    so the initial update scaling·B·A is the best rank-r approximation of W_i - W_j.

    ``diff`` is out x in (:meth:`Arch.weights` transposes GPT-2's Conv1D); PEFT's A and B have this
    layout for Conv1D too (``fan_in_fan_out=True`` only transposes the merged delta).
    Fused projections are one matrix here (why: the :mod:`flexigpt.model.arch` docstring)."""
    a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
    if tuple(diff.shape) != (b.shape[0], a.shape[1]):
        raise FlexiError("adapters.init", f"svd_diff got a {tuple(diff.shape)} weight difference for a LoRA of "
                         f"{b.shape[0]} x {a.shape[1]} (a wrong weight layout in the model family's Arch)",
                         "set adapters.init: zeros, and report the model family")
    r = a.shape[0]
    u, s, vh = torch.linalg.svd(diff.float(), full_matrices=False)
    with torch.no_grad():
        b.copy_((u[:, :r] * s[:r]) / scaling)
        a.copy_(vh[:r])


def zeros_init(layer: nn.Module, diff: torch.Tensor | None, scaling: float) -> None:
    """Standard LoRA init (PEFT's): A Kaiming-uniform, B = 0, so the update starts at zero."""
    with torch.no_grad():
        layer.lora_B[ADAPTER_NAME].weight.zero_()


INIT_STRATEGIES: dict[str, Callable[[nn.Module, torch.Tensor | None, float], None]] = {
    "svd_diff": svd_diff_init,
    "zeros": zeros_init,
}


# -- building -------------------------------------------------------------------------------------

def validate_spec(arch: Arch, spec: FlexiSpec) -> None:
    """Check a spec against a model before any weights are touched."""
    L = arch.num_blocks
    if spec.num_original_blocks != L:
        raise FlexiError("plan", f"was made for a {spec.num_original_blocks}-block model, this model has {L}",
                         "re-run the prune stage on this model")
    if any(not 0 <= s < L for s in spec.sources):
        raise FlexiError("plan", f"refers to blocks outside 0..{L - 1}", "re-run the prune stage on this model")
    valid = arch.target_names()
    bad = [t for t in spec.lora.targets if t not in valid and t != "all"]
    if bad:
        fused = {t: arch.unfused[t] for t in bad if t in arch.unfused}
        why = f" ({', '.join(f'{t} is part of the fused {f}' for t, f in fused.items())}: fused projections are " \
              "adapted whole)" if fused else ""
        raise FlexiError("adapters.targets", f"unknown target modules {bad} for {type(arch).__name__}{why}",
                         f"use a subset of {valid} (lora.targets are these names)")
    arch.check_uniform()
    if spec.lora.init not in INIT_STRATEGIES:
        raise FlexiError("adapters.init", f"unknown init {spec.lora.init!r}", f"use one of {sorted(INIT_STRATEGIES)}")
    if spec.gamma_init < 0:
        raise FlexiError("norm.gamma_init", f"must be >= 0, got {spec.gamma_init}", "use a small positive value such as 1e-3")
    targets = resolved_targets(arch, spec.lora)
    if spec.lora_positions and targets:
        if spec.lora.rank < 1:
            raise FlexiError("adapters.rank", f"must be >= 1, got {spec.lora.rank}", "set a positive rank")
        for name, w in arch.weights(0).items():
            if arch.target_of(name) in targets and spec.lora.rank > min(w.shape):
                raise FlexiError("adapters.rank", f"{spec.lora.rank} exceeds what {name} ({tuple(w.shape)}) allows",
                                 f"set it to at most {min(w.shape)}")


def tie_linears(arch: Arch, dst: nn.Module, src: nn.Module) -> None:
    """Make ``dst``'s linear layers use ``src``'s weight (and bias) tensors: shared storage, not copies."""
    for name in arch.linear_names:
        d, s = dst.get_submodule(name), src.get_submodule(name)
        d.weight = s.weight
        if getattr(d, "bias", None) is not None:
            d.bias = s.bias


def materialize(arch: Arch, spec: FlexiSpec) -> None:
    """Rebuild the block list by ``spec.sources``; replaced positions share their source's linears.

    A replaced position inside the original depth keeps its own block module (own pre-norms);
    a position beyond it (extension) starts as a copy of its source block.
    """
    old = list(arch.blocks())
    replaced = set(spec.replaced)
    new: list[nn.Module] = []
    for p, s in enumerate(spec.sources):
        if p in replaced:
            blk = old[p] if p < len(old) and p != s and p not in spec.sources else copy.deepcopy(old[s])
            tie_linears(arch, blk, old[s])
        else:
            blk = old[s]
        new.append(blk)
    arch.set_blocks(new)


def resolved_targets(arch: Arch, lora: LoraSettings) -> list[str]:
    """LoRA target leaf names with ``all`` expanded to every adaptable linear of the family."""
    return arch.target_names() if "all" in lora.targets else list(lora.targets)


def lora_target_regex(arch: Arch, positions: list[int], targets: list[str]) -> str:
    """A full-match regex over module names selecting ``targets`` in blocks ``positions``."""
    names = [n for n in arch.linear_names if arch.target_of(n) in targets]  # exact paths: GPT-2 has two c_proj
    pos = "|".join(str(p) for p in positions)
    return rf"{re.escape(arch.blocks_path)}\.({pos})\.({'|'.join(re.escape(n) for n in names)})"


def inject_lora(arch: Arch, spec: FlexiSpec) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = resolved_targets(arch, spec.lora)
    if not spec.lora_positions or not targets:
        return
    cfg = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha if spec.lora.alpha is not None else spec.lora.rank,
                     lora_dropout=0.0, bias="none", init_lora_weights=True,
                     fan_in_fan_out=arch.conv1d,  # Conv1D stores in x out; PEFT's A (r x in), B (out x r) stay as for Linear
                     target_modules=lora_target_regex(arch, spec.lora_positions, targets))
    inject_adapter_in_model(cfg, arch.model, adapter_name=ADAPTER_NAME)


def build(model: nn.Module, spec: FlexiSpec, *, init: bool = True, arch_cls: type[Arch] | None = None) -> nn.Module:
    """Turn ``model`` (in place) into the model ``spec`` describes; ``init`` runs the adapter init.
    ``arch_cls`` overrides the family's registered :class:`Arch` (the seam self-test's own checks)."""
    arch = arch_cls(model) if arch_cls is not None else arch_of(model)
    validate_spec(arch, spec)
    model.flexigpt_base_config = model.config.to_dict()  # the skeleton the compact format rebuilds
    diffs: dict[tuple[int, str], torch.Tensor] = {}
    if init and spec.lora.init == "svd_diff":
        for p in spec.replaced:  # W_p - W_source, from the original (pre-tie) weights
            s = spec.sources[p]
            if p < arch.num_blocks and p != s:
                wp, ws = arch.weights(p), arch.weights(s)
                diffs.update({(p, n): (wp[n].detach().float() - ws[n].detach().float()) for n in wp})
    materialize(arch, spec)
    inject_lora(arch, spec)
    if init:
        fn = INIT_STRATEGIES[spec.lora.init]
        for p in spec.lora_positions:
            for n, mod in arch.linears(p).items():
                if hasattr(mod, "lora_A"):
                    d = diffs.get((p, n))
                    (fn if d is not None else zeros_init)(mod, d, spec.lora.scaling)
    if spec.output_norm and spec.replaced:
        attach_output_norms(arch, spec.replaced, spec.gamma_init, spec.norm_eps)
    model.flexigpt_spec = spec  # what spec_of() reads: the compact format saves it as the layer map
    return model


# -- the one owner of "what is in this model" ------------------------------------------------------

def spec_of(model: nn.Module) -> FlexiSpec | None:
    """The :class:`FlexiSpec` a model was built from (None for a plain model)."""
    return getattr(model, "flexigpt_spec", None)


def is_lora_param(name: str) -> bool:
    """Whether a parameter/state name belongs to a LoRA adapter (PEFT's ``lora_A`` / ``lora_B``)."""
    return "lora_" in name


def is_output_norm_param(name: str) -> bool:
    """Whether a parameter/state name belongs to a FlexiGPT output norm (Eq. 6)."""
    return any(a in name for a in NORM_ATTRS.values())


def is_adapter_param(name: str) -> bool:
    """LoRA or output-norm: the per-position parameters that are trained and stored apart from the base."""
    return is_lora_param(name) or is_output_norm_param(name)


def unique_params(model: nn.Module) -> int:
    """Stored parameter count: each tensor once, however many positions share it."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen.setdefault(p.data_ptr(), p.numel())
    return sum(seen.values())


def adapter_params(model: nn.Module) -> int:
    """Parameters that belong to LoRA adapters and output norms."""
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))


def extend_spec(num_blocks: int, start: int, end: int, pattern: str, repeats: int, lora: LoraSettings, *,
                gamma_init: float = 1e-3, target_depth: int | None = None) -> FlexiSpec:
    """Grow a model by repeating blocks ``start..end`` (inclusive), paper §1.7.

    ``block``: each block repeated ``repeats`` times (a, a, b, b, …); ``sequential``: the whole
    range repeated (a..b, a..b). Every repeat after the first shares its source's weights and gets
    its own LoRA and output norms. W_repeat - W_source = 0, so ``svd_diff`` has nothing to take:
    repeat adapters start with B = 0 (standard LoRA init) and the small γ makes each repeat start
    near identity (exactly identity at γ = 0).
    """
    if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < num_blocks or not 0 <= end < num_blocks:
        raise FlexiError("extend.start", f"range [{start}, {end}] is outside blocks 0..{num_blocks - 1}",
                         f"use 0 <= start <= end <= {num_blocks - 1}")
    if start > end:
        raise FlexiError("extend.start", f"start {start} > end {end}", "swap them: start must be <= end")
    if not isinstance(repeats, int) or repeats < 1:
        raise FlexiError("extend.repeats", f"must be an integer >= 1, got {repeats!r}", "use 2 to double the range")
    if pattern not in ("block", "sequential"):
        raise FlexiError("extend.pattern", f"unknown pattern {pattern!r}", "use block or sequential")
    span = list(range(start, end + 1))
    mid = [b for b in span for _ in range(repeats)] if pattern == "block" else span * repeats
    sources = list(range(start)) + mid + list(range(end + 1, num_blocks))
    if target_depth is not None and target_depth != len(sources):
        per = end - start + 1
        raise FlexiError("extend.target_depth", f"{target_depth} cannot be reached: repeating {per} blocks "
                         f"{repeats}x gives depth {len(sources)}",
                         f"pick a range whose length divides {target_depth - num_blocks} "
                         f"(e.g. {target_depth - num_blocks} blocks repeated 2x), or set target_depth: null")
    seen: set[int] = set()
    replaced = []
    for p, s in enumerate(sources):
        if s in seen:
            replaced.append(p)
        seen.add(s)
    lora = LoraSettings(**{**asdict(lora), "init": "zeros"})
    return FlexiSpec(sources, replaced, num_blocks, replaced, lora, True, gamma_init)
