"""The seam self-test: FlexiGPT's identities checked on two or three real blocks of the user's model.

A wrong :class:`~flexigpt.model.arch.Arch` (an output norm hooked on the wrong module, a weight
read in the wrong layout, a lost sliding/full attention pattern) does not crash: it trains a worse
model. So :func:`init_flexigpt <flexigpt.variants.init_flexigpt>` runs :func:`self_test` on the
loaded base model first. It copies the embeddings, head and three blocks (a truncated model, a few
MB of blocks) and checks, in float32:

(a) FlexiGPT at γ = 0 (LoRA at ``svd_diff`` init) gives ShortGPT's logits (the block dropped);
(b) the layer-type pattern survives the depth change, and every attention module's own type matches
    its position's ``config.layer_types`` entry;
(c) ``Arch.weights`` is the function the linear computes (out x in, Conv1D transposed) and the
    LoRA delta at ``svd_diff`` init is the best rank-r approximation of W_pruned - W_base;
(d) at a small γ the replaced block is near identity: every token's update has RMS <= 2γ (two
    γ-scaled LayerNorm outputs join the residual). A hook on a module *before* a sandwich
    post-norm (Gemma) fails this: the post-norm re-normalises γ away.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from flexigpt.errors import FlexiError
from flexigpt.model import flexi as fm
from flexigpt.model.arch import Arch, arch_of

GAMMA = 1e-2  # small enough to be "near identity", large enough that a wrong seam's post-norm re-normalises it


def _fail(arch: Arch, what: str) -> FlexiError:
    return FlexiError("model.source", f"the FlexiGPT self-test on this {arch.facts(arch.model.config).model_type!r} "
                      f"model failed: {what}",
                      f"{type(arch).__name__} in flexigpt/model/arch.py does not describe this model correctly; "
                      "fix the seam (see the guide at the top of that file) or report the model family")


def truncated_copy(model: nn.Module, arch_cls: type[Arch], keep: list[int]) -> nn.Module:
    """A float32 deep copy of ``model`` with only blocks ``keep`` (the model itself is restored)."""
    arch = arch_cls(model)
    blocks = list(arch.blocks())
    try:
        arch.set_blocks([blocks[i] for i in keep])
        small = copy.deepcopy(model)
    finally:
        arch.set_blocks(blocks)
    for a in ("flexigpt_spec", "flexigpt_base_config", "flexigpt_form"):
        small.__dict__.pop(a, None)
    return small.float().eval()


def _blocks_copy(small: nn.Module, arch: Arch) -> nn.Module:
    """A copy of ``small`` with its own blocks; everything outside them (embeddings, head: never
    changed by a build) is shared, not copied."""
    inside = {id(t) for t in arch.blocks().parameters()}
    memo = {id(t): t for t in small.parameters() if id(t) not in inside}
    return copy.deepcopy(small, memo)


def _pick(types: list[str] | None, n: int) -> list[int]:
    """Blocks 0, 1 and the first later block of another layer type (so a type change is exercised)."""
    if n < 3:
        return list(range(n))
    other = next((j for j in range(2, n) if types and types[j] != types[1]), 2)
    return [0, 1, other]


def _check_types(arch: Arch, expected: list[str] | None, what: str) -> None:
    got = arch.layer_types()
    if got != expected:
        raise _fail(arch, f"after {what} the layer types are {got}, expected {expected}")
    for i, b in enumerate(arch.blocks()):
        for m in b.modules():
            lt = getattr(m, "layer_type", None)
            if expected and isinstance(lt, str) and lt != expected[i]:
                raise _fail(arch, f"after {what} position {i}'s attention runs as {lt!r} but config says {expected[i]!r}")
            if expected and hasattr(m, "sliding_window") and isinstance(lt, str) \
                    and (m.sliding_window is None) != (expected[i] != "sliding_attention"):
                raise _fail(arch, f"after {what} position {i}'s sliding window ({m.sliding_window}) does not match "
                            f"its type {expected[i]!r}")


@torch.no_grad()
def self_test(model: nn.Module, *, arch_cls: type[Arch] | None = None, rank: int = 8, seq_len: int = 16) -> dict:
    """Check the family's seam on real blocks of ``model`` (module docstring); raise a FlexiError on failure.

    ``arch_cls`` overrides the registered :class:`Arch` (tests use a deliberately wrong one).
    Returns the measured errors.
    """
    with torch.random.fork_rng(devices=[]):  # PEFT's LoRA init draws from the global RNG: the caller's stays put
        return _self_test(model, arch_cls or type(arch_of(model)), rank, seq_len)


def _self_test(model: nn.Module, arch_cls: type[Arch], rank: int, seq_len: int) -> dict:
    base_arch = arch_cls(model)
    types = base_arch.layer_types()
    keep = _pick(types, base_arch.num_blocks)
    if len(keep) < 2:
        return {"skipped": "fewer than 2 blocks"}
    small = truncated_copy(model, arch_cls, keep)
    sarch = arch_cls(small)
    device = next(small.parameters()).device
    n = len(keep)
    p, s = n - 1, n - 2  # replace the last kept block (of another type, if any) by its predecessor
    small_types = [types[i] for i in keep] if types else None
    _check_types(sarch, small_types, "truncating the model")
    r = min(rank, *(min(w.shape) for w in sarch.weights(0).values()))
    for name, w in sarch.weights(p).items():  # (c, first) Arch.weights is the matrix each linear applies
        lin = sarch.linears(p)[name]
        x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(1)).to(device)
        try:
            f = lin(x) - lin(torch.zeros_like(x[:1]))
            ok = f.shape == (4, w.shape[0]) and bool((f - x @ w.float().T).abs().max() <= 1e-4 * (1 + f.abs().max()))
        except RuntimeError:  # a shape mismatch: the layout is wrong
            ok = False
        if not ok:
            raise _fail(sarch, f"Arch.weights()[{name!r}] ({tuple(w.shape)}) is not the matrix the layer applies "
                        "(wrong layout: weights must be out x in, transposed for Conv1D)")
    vocab = int(sarch.embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, float] = {}

    # (a) γ = 0 is ShortGPT; (b) types survive both depth changes
    flexi = fm.build(_blocks_copy(small, sarch), fm.prune_spec(n, {p: s}, fm.LoraSettings(rank=r), gamma_init=0.0),
                     arch_cls=arch_cls)
    short = fm.build(_blocks_copy(small, sarch), fm.shortgpt_spec(n, [p]), arch_cls=arch_cls)
    farch, sharch = arch_cls(flexi), arch_cls(short)
    _check_types(farch, small_types, "FlexiGPT's rebuild")
    _check_types(sharch, [t for i, t in enumerate(small_types) if i != p] if small_types else None, "dropping a block")
    lf, ls = flexi(input_ids=ids).logits, short(input_ids=ids).logits
    out["gamma0_vs_shortgpt"] = (lf - ls).abs().max().item()
    if not out["gamma0_vs_shortgpt"] <= 1e-4 * (1 + ls.abs().max().item()):
        raise _fail(farch, f"at γ = 0 FlexiGPT's logits differ from ShortGPT's by {out['gamma0_vs_shortgpt']:.3g} "
                    "(the output norms do not zero what joins the residual: attn_residual / mlp_residual)")

    # (c) weight layout and svd_diff init, checked against what the original linears compute
    ref_p, ref_s = sarch.linears(p), sarch.linears(s)
    worst = 0.0
    for name, mod in farch.linears(p).items():
        w_p, w_s = sarch.weights(p)[name].float(), sarch.weights(s)[name].float()
        x = torch.randn(4, w_p.shape[1], generator=torch.Generator().manual_seed(1)).to(device)
        zero = x.new_zeros(1, w_p.shape[1])
        if not hasattr(mod, "lora_A"):
            continue
        u, sv, vh = torch.linalg.svd(w_p - w_s, full_matrices=False)
        best = x @ ((u[:, :r] * sv[:r]) @ vh[:r]).T
        # .forward: no hooks (OPT's fc2 carries the output norm)
        got = (mod.forward(x) - mod.forward(zero)) - (ref_s[name](x) - ref_s[name](zero))
        err = ((got - best).abs().max() / (1e-6 + best.abs().max())).item()
        worst = max(worst, err)
        if err > 1e-3:
            raise _fail(farch, f"the svd_diff LoRA on {name!r} is not the rank-{r} approximation of "
                        f"W_pruned - W_base (relative error {err:.3g}: a transposed or wrongly fused layout)")
    out["svd_init_rel_err"] = worst

    # (d) near identity at small γ: each token's update is two γ-scaled LayerNorm outputs
    for m in flexi.modules():
        if isinstance(m, fm.OutputNorm):
            m.gamma.fill_(GAMMA)
    seen: dict[str, torch.Tensor] = {}

    def grab(_m, args, kwargs, o):
        x = args[0] if args else kwargs["hidden_states"]
        seen["upd"] = (o[0] if isinstance(o, tuple) else o) - x

    h = farch.blocks()[p].register_forward_hook(grab, with_kwargs=True)
    try:
        flexi(input_ids=ids)
    finally:
        h.remove()
    rms = seen["upd"].float().pow(2).mean(-1).sqrt().max().item()
    out["small_gamma_update_rms"] = rms
    if rms > 2 * GAMMA * 1.01 + 1e-6:
        raise _fail(farch, f"at γ = {GAMMA} the replaced block changes the residual by RMS {rms:.3g} > 2γ: the output "
                    "norms are not on the modules whose outputs join the residual (a sandwich post-norm after "
                    "them re-normalises γ away); set attn_residual / mlp_residual to those modules")
    return out
