"""Self-speculative greedy decoding (paper §4.2): draft with blocks skipped, verify with the full model.

The draft
---------
:func:`make_skip_draft` returns the *same* model with some block positions left out: for
FlexiGPT the replaced (weight-shared) positions, which gives the ShortGPT architecture with the
same weights (kept blocks' LoRA included); for a dense model any list of blocks, e.g. the plan's
pruned ones (a free draft, no training). The draft is a second ``*ForCausalLM`` object that is a
*view*: every parameter and buffer is the model's own tensor (zero stored or copied weights, see
``tests/test_serve.py``), and so are the embeddings, final norm, LM head, MLPs, linears and norms.
Only three small things are the draft's own:

* its block list (a new ``nn.ModuleList`` holding the kept block modules);
* per kept block, a shallow copy of the module that carries ``layer_idx`` (the attention), holding
  the same linears: ``layer_idx`` is the block's slot in the KV cache, and in the draft block ``i``
  sits at slot ``j``. So the draft's own cache, built for the draft's depth, is dense and
  consistent, and never touches the full model's cache;
* its config (depth, ``layer_types``) and generation config (draft length K).

Why transformers' assisted generation is used as is
---------------------------------------------------
``model.generate(..., assistant_model=draft)`` takes this draft correctly: the draft is a plain
``*ForCausalLM`` of the same vocabulary, its cache lives in the candidate generator (its own), the
verifier's cache is cropped after every round and, for greedy decoding, a drafted token is kept
only up to the first mismatch with the verifier's argmax, then the verifier's own next token is
appended. We fix K (``num_assistant_tokens_schedule="constant"``) and switch off the draft's
confidence-based early stop, so every round drafts K tokens (fewer near ``max_new_tokens``). No
loop of our own is needed. The counts come from outside transformers' internals: drafted and
accepted tokens from wrapping the draft's ``generate`` (the draft object is ours), rounds from a
forward pre-hook on the model that is removed after the call.

What is guaranteed
------------------
Greedy decoding only: ``generate(..., speculative=True)`` returns the tokens of plain greedy
decoding of the full model (``speculative=False``), token for token. Exact in exact arithmetic;
in floating point the verifier scores K+1 positions in one forward instead of one at a time, and
a matmul of another shape may round the last bit differently, so two logits tied to within
rounding could pick another argmax (never seen in the tests, float32; lower precision makes
near-ties likelier). Sampling (``do_sample``, temperature, top-k/p, beams, penalties) is not
offered: speculative *sampling* preserves the full model's distribution, not its tokens, so no
identical-output guarantee covers it, and asking for it raises :class:`FlexiError`.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from flexigpt.config import check_int
from flexigpt.errors import FlexiError
from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of

# generate() settings that would leave greedy decoding (values that keep it greedy are allowed)
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
                 "eta_cutoff", "num_beams", "num_beam_groups", "penalty_alpha", "repetition_penalty",
                 "no_repeat_ngram_size", "diversity_penalty", "guidance_scale")
_GREEDY_VALUES: dict[str, Any] = {"do_sample": False, "num_beams": 1, "num_beam_groups": 1}


@dataclass
class GenerateStats:
    """What one :func:`generate` call did; ``accepted``/``drafted`` count draft tokens (speculative only)."""

    new_tokens: int
    speculative: bool = False
    draft_tokens: int = 0                                # K: tokens drafted per round
    skipped: list[int] = field(default_factory=list)     # block positions the draft leaves out
    rounds: int = 0                                      # draft-then-verify rounds (= verifier forwards)
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round}


# -- the draft: a view of the model with some block positions skipped ------------------------------

def check_skip(model: nn.Module, skip: Any, param: str = "skip") -> list[int]:
    """``skip`` as a sorted list of distinct block positions of ``model``, leaving at least one block."""
    n = arch_of(model).num_blocks
    if not isinstance(skip, (list, tuple)) or not skip or \
            any(isinstance(i, bool) or not isinstance(i, int) for i in skip):
        raise FlexiError(param, f"must be a non-empty list of block positions, got {skip!r}",
                         "pass e.g. the plan's pruned blocks (artifacts/plan/plan.json: pruned)")
    bad = sorted({i for i in skip if not 0 <= i < n})
    if bad:
        raise FlexiError(param, f"blocks {bad} are outside 0..{n - 1}", f"use positions in 0..{n - 1}")
    if len(set(skip)) >= n:
        raise FlexiError(param, f"skips all {n} blocks", "keep at least one block in the draft")
    return sorted(set(skip))


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters, buffers, children and hooks (own dicts, so
    replacing a child or an attribute in the copy leaves the original alone)."""
    c = module.__class__.__new__(module.__class__)
    c.__dict__ = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    return c


def _renumbered(module: nn.Module, idx: int) -> nn.Module:
    """``module`` itself, or (if it holds a KV-cache ``layer_idx``) a shallow view whose ``layer_idx`` is ``idx``."""
    if not any(hasattr(m, "layer_idx") for m in module.modules()):
        return module
    c = _shallow(module)
    for name, child in module._modules.items():
        if child is not None:
            c._modules[name] = _renumbered(child, idx)
    if hasattr(c, "layer_idx"):
        c.layer_idx = idx
    return c


def make_skip_draft(model: nn.Module, skip: list[int]) -> nn.Module:
    """The model with block positions ``skip`` left out: shares every tensor, has its own KV cache."""
    arch = arch_of(model)
    skip = check_skip(model, skip)
    kept = [i for i in range(arch.num_blocks) if i not in set(skip)]
    blocks = arch.blocks()
    config = copy.deepcopy(model.config)
    text = arch.text_config(config)  # multimodal Gemma 3: depth and layer types live in text_config
    setattr(text, arch.depth_key, len(kept))  # the backbone runs config-depth blocks; the cache is built for it
    if isinstance(getattr(text, "layer_types", None), list) and len(text.layer_types) == arch.num_blocks:
        text.layer_types = [text.layer_types[i] for i in kept]
    draft = _shallow(model)
    path = [draft]
    parent_path, _, attr = arch.blocks_path.rpartition(".")
    for name in filter(None, parent_path.split(".")):  # own copies down to the block list's parent
        path.append(_shallow(path[-1]._modules[name]))
        path[-2]._modules[name] = path[-1]
    path[-1]._modules[attr] = nn.ModuleList([_renumbered(blocks[i], j) for j, i in enumerate(kept)])
    for m in path:
        if m.__dict__.get("config") is model.config:
            m.config = config
        elif m.__dict__.get("config") is arch.config:
            m.config = text
    draft.generation_config = copy.deepcopy(model.generation_config)
    for a in ("flexigpt_spec", "flexigpt_base_config", "flexigpt_form"):  # not a saveable flexigpt model
        draft.__dict__.pop(a, None)
    draft.flexigpt_draft = {"skipped": skip, "kept": kept}
    return draft.eval()


def make_draft(model: nn.Module) -> nn.Module:
    """FlexiGPT's self-draft: the replaced positions skipped (ShortGPT architecture, same weights)."""
    return make_skip_draft(model, _replaced(model))


def _replaced(model: nn.Module) -> list[int]:
    spec = fm.spec_of(model)
    if spec is None or not spec.replaced:
        raise FlexiError("speculative", "this model has no replaced positions to skip (a dense or ShortGPT model), "
                         "so it has no self-draft",
                         "pass skip=[...] (e.g. the plan's pruned blocks) for a skip-draft of a dense model, "
                         "or decode without speculative")
    return list(spec.replaced)


# -- generation ----------------------------------------------------------------------------------

def check_greedy(sampling: dict[str, Any]) -> None:
    """Refuse settings that leave greedy decoding (the only decoding with the identical-output guarantee)."""
    unknown = sorted(k for k in sampling if k not in SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
    bad = {k: v for k, v in sampling.items() if v is not None and _GREEDY_VALUES.get(k, object()) != v}
    if bad:
        raise FlexiError("sampling", f"{bad} not offered: only greedy decoding is, whose speculative output is "
                         "guaranteed identical to plain greedy decoding of the full model (speculative sampling "
                         "would only match its distribution)",
                         "drop the sampling settings (greedy decoding)")


def _check_ids(model: nn.Module, input_ids: Any, max_new_tokens: int, speculative: bool) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dim() not in (1, 2) \
            or input_ids.shape[-1] < 1:
        raise FlexiError("prompt", "must be a non-empty integer tensor of token ids, [T] or [B, T]",
                         "tokenize the prompt first (tokenizer(text, return_tensors='pt').input_ids)")
    ids = input_ids.long().view(1, -1) if input_ids.dim() == 1 else input_ids.long()
    if speculative and ids.shape[0] != 1:
        raise FlexiError("prompt", f"speculative decoding takes one prompt at a time, got a batch of {ids.shape[0]}",
                         "decode the prompts one by one, or without speculative")
    limit = arch_of(model).max_positions
    if limit is not None:
        t = ids.shape[1]
        if t >= limit:
            raise FlexiError("prompt", f"is {t} tokens; the model's context is {limit} positions, leaving no room "
                             "for new tokens", f"shorten the prompt to under {limit} tokens")
        if t + max_new_tokens > limit:
            raise FlexiError("max_new_tokens", f"{t} prompt tokens + {max_new_tokens} new tokens exceed the "
                             f"model's context of {limit} positions",
                             f"set max_new_tokens to at most {limit - t}, or shorten the prompt")
    return ids


@contextlib.contextmanager
def _eos(model: nn.Module, eos_token_id: int | None) -> Iterator[None]:
    """transformers fills an unset ``eos_token_id`` from ``model.generation_config``: here None must mean
    "never stop early", so the model's default is switched to ours for the call."""
    gc = model.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = eos_token_id
    try:
        yield
    finally:
        gc.eos_token_id = old


def _accepted(final: list[int], start: int, drafted: list[int]) -> int:
    """Leading drafted tokens equal to the verified sequence from ``start``: what the verifier kept."""
    n = 0
    while n < len(drafted) and start + n < len(final) and final[start + n] == drafted[n]:
        n += 1
    return n


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 64, *, speculative: bool = False,
             draft_tokens: int = 4, skip: list[int] | None = None, eos_token_id: int | None = None,
             **sampling: Any) -> tuple[torch.Tensor, GenerateStats]:
    """Greedy decoding of ``model``, optionally self-speculative; returns (prompt + new tokens [B, T+n], stats).

    ``speculative``: draft ``draft_tokens`` (K) tokens per round with the model's skip-draft (``skip``,
    or the replaced positions of a FlexiGPT model) and verify them with the full model; the output
    is plain greedy decoding's, token for token (module docstring). ``eos_token_id``: stop after
    this token (None: exactly ``max_new_tokens``). Sampling settings raise :class:`FlexiError`.
    """
    check_greedy(sampling)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, min=1)
    draft_tokens = check_int("draft_tokens", draft_tokens, min=1)
    ids = _check_ids(model, input_ids, max_new_tokens, speculative)
    skip = check_skip(model, skip) if skip is not None else (_replaced(model) if speculative else [])
    ids = ids.to(next(model.parameters()).device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
              eos_token_id=eos_token_id, pad_token_id=eos_token_id if eos_token_id is not None else 0)
    if not speculative:
        with _eos(model, eos_token_id):
            out = model.generate(ids, **kw)
        return out, GenerateStats(new_tokens=out.shape[1] - ids.shape[1])
    draft = make_skip_draft(model, skip)
    gc = draft.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = draft_tokens, "constant"
    gc.assistant_confidence_threshold = 0.0  # no early stop of a round: K is K
    gc.eos_token_id = None                   # the verifier decides where to stop
    rounds: list[tuple[int, list[int]]] = []
    inner = draft.generate

    def recording(*args: Any, **kwargs: Any):
        res = inner(*args, **kwargs)
        start = kwargs["input_ids"].shape[1]
        rounds.append((start, res.sequences[0, start:].tolist()))
        return res

    draft.generate = recording  # counts each round's drafted tokens; the draft object is ours alone
    verifies = []
    hook = model.register_forward_pre_hook(lambda *_: verifies.append(1))  # one verifier forward per round
    try:
        with _eos(model, eos_token_id):
            out = model.generate(ids, assistant_model=draft, **kw)
    finally:
        hook.remove()
    final = out[0].tolist()
    return out, GenerateStats(new_tokens=out.shape[1] - ids.shape[1], speculative=True, draft_tokens=draft_tokens,
                              skipped=skip, rounds=len(verifies), drafted=sum(len(d) for _, d in rounds),
                              accepted=sum(_accepted(final, s, d) for s, d in rounds))
