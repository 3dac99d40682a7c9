"""The architecture seam: the one module that knows a model family's module and config names.

Everything else in flexigpt is model-agnostic and talks to an :class:`Arch` (the idea of
SliceGPT's ``ModelAdapter``): blocks, their linear weights and pre-norms, the modules whose
outputs join the residual stream, embeddings, backbone, head (and the head path: :meth:`Arch.logits`),
and the config facts (depth, positions, widths, per-layer attention types). In flexigpt
"adapter" means a LoRA adapter only.

How to add a model family (read ``transformers/models/<family>/modeling_<family>.py``, don't guess):

1. Subclass :class:`Arch` and set every name in ``Arch.REQUIRED`` (a missing or empty one fails
   at class definition, not at the first run). ``linear_names`` are the block-relative paths of
   the adaptable linears; fused projections (Phi-3 ``qkv_proj``) stay fused (see below).
   Their LoRA target names are derived: the shortest unique suffix of each path (:meth:`Arch.target_of`).
2. ``attn_residual`` / ``mlp_residual`` name the module whose output *joins the residual
   stream*: the attention / MLP module itself for pre-norm families (Llama, OPT, GPT-2, NeoX),
   the post-sublayer norm for sandwich-norm families (Gemma 2/3: ``post_attention_layernorm``,
   ``post_feedforward_layernorm``). FlexiGPT's output norms (paper Eq. 6) hook there.
3. Config keys: ``depth_key`` / ``hidden_key`` / ``heads_key`` / ``positions_keys`` (GPT-2 says
   ``n_layer``…); ``text_config_key`` when the text facts sit in a sub-config (multimodal Gemma 3).
4. Head path: ``softcap_key`` if the model soft-caps its logits (Gemma 2); override
   :meth:`Arch.logits` if it does more.
5. Add the class to ``ARCHS`` and a tiny config to ``tests/families.py``; ``tests/test_families.py``
   runs the invariant suite on it, and :func:`flexigpt.model.selftest.self_test` checks the seam
   on the user's real model at build time.

Fused projections (Phi-3 ``qkv_proj`` / ``gate_up_proj``, NeoX ``query_key_value``, GPT-2
``c_attn``) are adapted, SVD-initialised and compared whole, not per slice, because PEFT LoRA
wraps whole nn.Linear modules; a LoRA on the fused matrix is a superset of per-slice LoRAs at the
same rank budget; the checkpoint keys stay the family's own (so the HF export loads with
AutoModelForCausalLM); and the SVD distance of the fused matrix is the distance of the
concatenated slices. A per-slice target (``q_proj`` on Phi-3) is refused with the valid targets
(``Arch.unfused`` names the fused module that holds it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from flexigpt.errors import FlexiError

LAYER_TYPE = "flexigpt_layer_type"  # block attribute: the layer type (config.layer_types[i]) it was built with


# decoder-less or encoder-decoder families: FlexiGPT prunes decoder-only causal LMs only
ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "camembert",
    "modernbert", "mpnet", "t5", "mt5", "umt5", "longt5", "t5gemma", "bart", "mbart", "pegasus", "marian", "led",
    "whisper", "encoder-decoder", "vit", "clip", "siglip", "wav2vec2", "hubert"})


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dict, ``config.key`` for a config object."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline needs to know about a model before loading any weights."""

    model_type: str
    num_blocks: int
    hidden_size: int
    max_positions: int | None
    attention_width: int


class Arch:
    """Architecture specifics for one transformers model instance."""

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "model_types", "blocks_path", "linear_names", "norm_names", "attn_residual", "mlp_residual",
        "embed_path", "final_norm_path", "backbone_path", "head_path")

    model_types: ClassVar[tuple[str, ...]]   # config.model_type values this class serves
    blocks_path: ClassVar[str]               # dotted path of the ModuleList of blocks
    linear_names: ClassVar[tuple[str, ...]]  # block-relative names of the adaptable (shared) linears
    norm_names: ClassVar[tuple[str, ...]]    # block-relative names of the block's own norms
    attn_residual: ClassVar[str]             # block-relative module whose output joins the residual (attention)
    mlp_residual: ClassVar[str]              # block-relative module whose output joins the residual (MLP)
    embed_path: ClassVar[str]
    final_norm_path: ClassVar[str]
    backbone_path: ClassVar[str]             # the decoder without the LM head (returns last_hidden_state)
    head_path: ClassVar[str]
    # config keys (families name them differently)
    depth_key: ClassVar[str] = "num_hidden_layers"
    hidden_key: ClassVar[str] = "hidden_size"
    heads_key: ClassVar[str] = "num_attention_heads"
    positions_keys: ClassVar[tuple[str, ...]] = ("max_position_embeddings",)
    text_config_key: ClassVar[str | None] = None  # sub-config holding the text facts (multimodal wrappers)
    softcap_key: ClassVar[str | None] = None      # config key of the final-logit soft-cap, if the model applies one
    unfused: ClassVar[dict[str, str]] = {}        # per-slice name users may expect -> the fused target holding it
    conv1d: ClassVar[bool] = False                # linears are transformers' Conv1D (weights in x out)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        missing = [a for a in cls.REQUIRED if not getattr(cls, a, None)]
        if missing:
            raise TypeError(f"{cls.__name__} does not define {missing}: every Arch sets all of {list(cls.REQUIRED)}")
        for a in ("linear_names", "norm_names", "model_types"):
            if not isinstance(getattr(cls, a), tuple):
                raise TypeError(f"{cls.__name__}.{a} must be a tuple of names")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tag_layer_types()

    # -- config facts (no weights needed) ------------------------------------------------------
    @classmethod
    def text_config(cls, config: Any) -> Any:
        """The (sub-)config the decoder blocks are built from: ``config`` itself, or its text config."""
        sub = _get(config, cls.text_config_key) if cls.text_config_key else None
        return config if sub is None else sub

    @classmethod
    def facts(cls, config: Any) -> ModelFacts:
        """Depth, widths and maximum positions from a config object or dict."""
        text = cls.text_config(config)
        get = lambda k, d=None: _get(text, k, d)  # noqa: E731
        try:
            hidden, heads, depth = int(get(cls.hidden_key)), int(get(cls.heads_key)), int(get(cls.depth_key))
        except (TypeError, ValueError):
            raise FlexiError("model.source", f"the {_get(config, 'model_type')!r} config lacks "
                             f"{cls.depth_key!r}/{cls.hidden_key!r}/{cls.heads_key!r}",
                             "use the model's own config.json (re-run import_model)") from None
        head_dim = get("head_dim", None) or hidden // heads
        positions = next((int(get(k)) for k in cls.positions_keys if isinstance(get(k, None), int)), None)
        return ModelFacts(model_type=str(_get(config, "model_type")), num_blocks=depth,
                          hidden_size=hidden, max_positions=positions, attention_width=heads * int(head_dim))

    @classmethod
    def config_layer_types(cls, config: Any) -> list[str] | None:
        """Per-block layer types (``sliding_attention`` / ``full_attention``…) from a config object or
        dict, without weights; None for families without per-layer types. A dict that lacks
        ``layer_types`` gets transformers' own default pattern (Gemma 2 alternates, Gemma 3 5:1)."""
        if isinstance(config, dict) and cls.text_config(config).get("layer_types") is None:
            from transformers import AutoConfig

            d = dict(config)
            try:
                config = AutoConfig.for_model(d.pop("model_type"), **d)
            except Exception:  # noqa: BLE001  (a config transformers rejects has no defaults to offer)
                return None
        types = _get(cls.text_config(config), "layer_types")
        return [str(t) for t in types] if isinstance(types, (list, tuple)) else None

    @property
    def config(self):
        """The config the backbone reads depth and layer types from (the text config of a multimodal model)."""
        return self.text_config(self.model.config)

    @property
    def hidden_size(self) -> int:
        return self.facts(self.model.config).hidden_size

    @property
    def max_positions(self) -> int | None:
        return self.facts(self.model.config).max_positions

    @property
    def attention_width(self) -> int:
        """num_heads x head_dim: the width of Q, K-after-repeat and V."""
        return self.facts(self.model.config).attention_width

    def layer_types(self) -> list[str] | None:
        """The loaded model's per-position layer types (None for families without them)."""
        return self.config_layer_types(self.model.config)

    # -- structure -----------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def linears(self, i: int) -> dict[str, nn.Module]:
        """Block ``i``'s adaptable linear layers, keyed by block-relative name."""
        b = self.blocks()[i]
        return {n: b.get_submodule(n) for n in self.linear_names}

    @staticmethod
    def stores_in_by_out(module: nn.Module) -> bool:
        """Whether a linear keeps its weight as in x out (GPT-2's ``Conv1D``) instead of nn.Linear's out x in."""
        from transformers.pytorch_utils import Conv1D

        return isinstance(getattr(module, "base_layer", module), Conv1D)

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s linear weight matrices, always out x in (a transposed view for Conv1D),
        through any PEFT wrapper. Views share storage, so ``data_ptr`` still shows weight sharing."""
        out = {}
        for n, m in self.linears(i).items():
            w = getattr(m, "base_layer", m).weight
            out[n] = w.T if self.stores_in_by_out(m) else w
        return out

    def norms(self, i: int) -> dict[str, nn.Module]:
        b = self.blocks()[i]
        return {n: b.get_submodule(n) for n in self.norm_names}

    def residual_outputs(self, i: int) -> dict[str, nn.Module]:
        """Block ``i``'s modules whose outputs join the residual: ``{"attn": ..., "mlp": ...}``."""
        b = self.blocks()[i]
        return {"attn": b.get_submodule(self.attn_residual), "mlp": b.get_submodule(self.mlp_residual)}

    def embeddings(self) -> nn.Module:
        return self.model.get_submodule(self.embed_path)

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.final_norm_path)

    def backbone(self) -> nn.Module:
        """The decoder without the LM head: all blocks, returns ``last_hidden_state``."""
        return self.model.get_submodule(self.backbone_path)

    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head path on the backbone's output: ``head(h)``, soft-capped where the
        family does it (Gemma 2: ``tanh(z / cap) * cap``). Use this, never ``head()(h)`` by hand."""
        logits = self.head()(hidden)
        cap = _get(self.config, self.softcap_key) if self.softcap_key else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- LoRA target names -----------------------------------------------------------------------
    @classmethod
    def target_of(cls, name: str) -> str:
        """The user-facing LoRA target of linear ``name``: the shortest dotted suffix of its path
        that no other linear of the block ends with (``q_proj`` on Llama, ``mlp.c_proj`` on GPT-2)."""
        parts = name.split(".")
        others = [o for o in cls.linear_names if o != name]
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                return suffix
        return name

    @classmethod
    def target_names(cls) -> list[str]:
        """The LoRA target names of the adaptable linears, as users write them (:meth:`target_of`)."""
        return [cls.target_of(n) for n in cls.linear_names]

    def check_uniform(self) -> None:
        """Every block must hold the same linears with the same shapes: weight sharing swaps them."""
        ref = {n: tuple(w.shape) for n, w in self.weights(0).items()}
        for i in range(1, self.num_blocks):
            got = {n: tuple(w.shape) for n, w in self.weights(i).items()}
            if got != ref:
                diff = sorted(n for n in ref if ref[n] != got.get(n))
                raise FlexiError("model.source", f"block {i} of this {self.facts(self.model.config).model_type!r} "
                                 f"model differs from block 0 in {diff} ({[got.get(n) for n in diff]} vs "
                                 f"{[ref[n] for n in diff]}); FlexiGPT shares weights between blocks, so every "
                                 "block needs the same matrices and shapes",
                                 "use a model whose blocks are all alike (no per-layer widths)")

    # -- depth changes ---------------------------------------------------------------------------
    def tag_layer_types(self) -> None:
        """Tag each block with the layer type it was built with (``config.layer_types[i]``), once,
        so the type travels with the block through drops, repeats and copies."""
        types = getattr(self.config, "layer_types", None)
        blocks = self.model.get_submodule(self.blocks_path)
        if isinstance(types, (list, tuple)) and len(types) == len(blocks):
            for b, t in zip(blocks, types):
                if not hasattr(b, LAYER_TYPE):
                    setattr(b, LAYER_TYPE, t)

    def set_blocks(self, blocks: list[nn.Module]) -> None:
        """Replace the block list (drop / repeat), keeping config and KV-cache indices consistent:
        ``config.layer_types`` becomes the types the blocks were built with (their tags), so each
        position keeps its mask, sliding window and rotary base."""
        self.tag_layer_types()
        old_types = getattr(self.config, "layer_types", None)
        parent_path, _, attr = self.blocks_path.rpartition(".")
        setattr(self.model.get_submodule(parent_path), attr, nn.ModuleList(blocks))
        setattr(self.config, self.depth_key, len(blocks))
        if isinstance(old_types, (list, tuple)):
            untagged = [i for i, b in enumerate(blocks) if not hasattr(b, LAYER_TYPE)]
            if untagged and len(set(old_types)) > 1:
                raise FlexiError("model.source", f"blocks {untagged} have no layer type tag, so their attention type "
                                 "(sliding / full) is unknown", "build new blocks as copies of the model's own blocks")
            self.config.layer_types = [getattr(b, LAYER_TYPE, old_types[0] if old_types else None) for b in blocks]
        self.renumber()

    def renumber(self) -> None:
        """Give every block's attention its position as ``layer_idx`` (used by the KV cache)."""
        for i, b in enumerate(self.blocks()):
            for m in b.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i


class LlamaArch(Arch):
    """Llama, Mistral, Qwen2 and SmolLM: pre-RMSNorm blocks with gated MLP."""

    model_types = ("llama", "mistral", "qwen2")
    blocks_path = "model.layers"
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    norm_names = ("input_layernorm", "post_attention_layernorm")
    attn_residual = "self_attn"
    mlp_residual = "mlp"
    embed_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    backbone_path = "model"
    head_path = "lm_head"


class Qwen3Arch(LlamaArch):
    """Qwen3: Llama layout plus per-head RMSNorms on q and k inside attention (norms, not linears:
    each position keeps its own, like its pre-norms)."""

    model_types = ("qwen3",)
    norm_names = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


class Gemma2Arch(LlamaArch):
    """Gemma 2: sandwich norms (a post-attention and a post-feedforward RMSNorm before each residual
    add), so the output norms hook on the post-norms; alternating sliding / full attention; soft-capped logits."""

    model_types = ("gemma2",)
    norm_names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")
    attn_residual = "post_attention_layernorm"
    mlp_residual = "post_feedforward_layernorm"
    softcap_key = "final_logit_softcapping"


class Gemma3TextArch(Gemma2Arch):
    """Gemma 3 text (``Gemma3ForCausalLM``): Gemma 2's layout plus q/k norms; local and global
    layers use different RoPE bases (chosen per position from ``config.layer_types``)."""

    model_types = ("gemma3_text",)
    norm_names = Gemma2Arch.norm_names + ("self_attn.q_norm", "self_attn.k_norm")


class Gemma3Arch(Gemma3TextArch):
    """Multimodal Gemma 3 (``Gemma3ForConditionalGeneration``): the text decoder is
    ``model.language_model`` (its backbone, not ``model.base_model``), facts under ``text_config``.
    Its head does not soft-cap (unlike ``Gemma3ForCausalLM``)."""

    model_types = ("gemma3",)
    blocks_path = "model.language_model.layers"
    embed_path = "model.language_model.embed_tokens"
    final_norm_path = "model.language_model.norm"
    backbone_path = "model.language_model"
    text_config_key = "text_config"
    softcap_key = None


class Phi3Arch(LlamaArch):
    """Phi-3: Llama layout with fused ``qkv_proj`` and ``gate_up_proj`` (adapted whole: see the module docstring)."""

    model_types = ("phi3",)
    linear_names = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    unfused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


class GPTNeoXArch(Arch):
    """GPT-NeoX / Pythia: parallel residual (x + Attn(LN1 x) + MLP(LN2 x)), fused ``query_key_value``."""

    model_types = ("gpt_neox",)
    blocks_path = "gpt_neox.layers"
    linear_names = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    norm_names = ("input_layernorm", "post_attention_layernorm")
    attn_residual = "attention"
    mlp_residual = "mlp"
    embed_path = "gpt_neox.embed_in"
    final_norm_path = "gpt_neox.final_layer_norm"
    backbone_path = "gpt_neox"
    head_path = "lm_head"
    unfused = {"q_proj": "query_key_value", "k_proj": "query_key_value", "v_proj": "query_key_value"}


class OPTArch(Arch):
    """OPT: pre-LayerNorm blocks (the 125m..175B checkpoints) with fc1/fc2 MLP.

    OPT's MLP is not a submodule: ``fc2``'s output (after dropout, a no-op in eval) joins the residual.
    """

    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    norm_names = ("self_attn_layer_norm", "final_layer_norm")
    attn_residual = "self_attn"
    mlp_residual = "fc2"
    embed_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"
    backbone_path = "model"
    head_path = "lm_head"


class GPT2Arch(Arch):
    """GPT-2: ``Conv1D`` linears (weights stored in x out; :meth:`Arch.weights` transposes), fused
    ``c_attn``, and two ``c_proj`` (targets ``attn.c_proj`` / ``mlp.c_proj``); learned positions."""

    model_types = ("gpt2",)
    conv1d = True  # PEFT needs fan_in_fan_out=True for these
    blocks_path = "transformer.h"
    linear_names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    norm_names = ("ln_1", "ln_2")
    attn_residual = "attn"
    mlp_residual = "mlp"
    embed_path = "transformer.wte"
    final_norm_path = "transformer.ln_f"
    backbone_path = "transformer"
    head_path = "lm_head"
    depth_key, hidden_key, heads_key, positions_keys = "n_layer", "n_embd", "n_head", ("n_positions",)
    unfused = {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "c_proj": "attn.c_proj / mlp.c_proj"}


ARCHS: tuple[type[Arch], ...] = (LlamaArch, Qwen3Arch, Gemma2Arch, Gemma3TextArch, Gemma3Arch, Phi3Arch,
                                 GPTNeoXArch, OPTArch, GPT2Arch)


def supported_model_types() -> list[str]:
    return sorted(t for c in ARCHS for t in c.model_types)


def arch_class(model_type: str | None) -> type[Arch]:
    """The :class:`Arch` subclass serving ``model_type``; a clear error for unsupported families."""
    for cls in ARCHS:
        if model_type in cls.model_types:
            return cls
    if model_type in ENCODER_TYPES:
        raise FlexiError("model.source", f"{model_type!r} is an encoder or encoder-decoder model; FlexiGPT prunes "
                         "only decoder-only causal LMs", f"use a decoder-only causal LM: one of {supported_model_types()}")
    what = "the config has no model_type" if model_type is None else f"model family {model_type!r} is not supported"
    raise FlexiError("model.source", what,
                     f"use one of {supported_model_types()}, or add an Arch subclass in flexigpt/model/arch.py "
                     "(its docstring says how)")


def arch_for_config(config: dict[str, Any] | Any) -> type[Arch]:
    """The :class:`Arch` for a config dict (or object), before any weights load: rejects encoder and
    encoder-decoder models and unsupported families with a FlexiError, and checks the facts read."""
    model_type = _get(config, "model_type")
    if _get(config, "is_encoder_decoder", False) and model_type not in supported_model_types():
        raise FlexiError("model.source", f"{model_type!r} is an encoder-decoder model; FlexiGPT prunes only "
                         "decoder-only causal LMs", f"use a decoder-only causal LM: one of {supported_model_types()}")
    cls = arch_class(model_type)
    cls.facts(config)  # the depth/width keys are there
    return cls


def arch_of(model: nn.Module) -> Arch:
    """The :class:`Arch` of a loaded model (by ``model.config.model_type``)."""
    return arch_class(getattr(getattr(model, "config", None), "model_type", None))(model)


def facts_of(folder: str | os.PathLike, param: str = "paths.base_model") -> ModelFacts:
    """:class:`ModelFacts` from a model folder's ``config.json``, without loading weights."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise FlexiError(param, f"no model at {Path(folder)} (config.json missing)",
                         "run the import_model stage first (`dvc repro import_model`)")
    d = json.loads(cfg.read_text())
    return arch_for_config(d).facts(d)
