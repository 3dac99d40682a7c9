"""The architecture seam: the one module that knows a model family's module and config names.

Everything else in flexigpt is model-agnostic and talks to an :class:`Arch` (the idea of
SliceGPT's ``ModelAdapter``): blocks, their linear weights and pre-norms, the modules whose
outputs join the residual stream, embeddings, backbone, head, and the config facts (depth,
positions, widths). In flexigpt "adapter" means a LoRA adapter only.

How to add a model family:

1. Subclass :class:`Arch` and set every name in ``Arch.REQUIRED`` (a missing or empty one fails
   at class definition, not at the first run).
2. ``attn_residual`` / ``mlp_residual`` name the module whose output *joins the residual
   stream*: the attention / MLP module itself for pre-norm families (Llama, OPT), the post-sublayer
   norm for families that have one (Gemma 2/3). FlexiGPT's output norms (paper Eq. 6) hook there.
3. Add the class to ``ARCHS``; ``tests/test_arch.py`` runs the invariant suite on a tiny
   random config of each registered family.
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

    # -- config facts (no weights needed) ------------------------------------------------------
    @classmethod
    def facts(cls, config: Any) -> ModelFacts:
        """Depth, widths and maximum positions from a config object or dict."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        hidden, heads = int(get(cls.hidden_key)), int(get(cls.heads_key))
        head_dim = get("head_dim", None) or hidden // heads
        positions = next((int(get(k)) for k in cls.positions_keys if isinstance(get(k, None), int)), None)
        return ModelFacts(model_type=str(get("model_type")), num_blocks=int(get(cls.depth_key)),
                          hidden_size=hidden, max_positions=positions, attention_width=heads * int(head_dim))

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.facts(self.config).hidden_size

    @property
    def max_positions(self) -> int | None:
        return self.facts(self.config).max_positions

    @property
    def attention_width(self) -> int:
        """num_heads x head_dim: the width of Q, K-after-repeat and V."""
        return self.facts(self.config).attention_width

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

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s linear weight matrices (out x in), through any PEFT wrapper."""
        return {n: getattr(m, "base_layer", m).weight for n, m in self.linears(i).items()}

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

    @classmethod
    def target_names(cls) -> list[str]:
        """Leaf names (``q_proj``…) of the adaptable linears, as users write LoRA targets."""
        return [n.rsplit(".", 1)[-1] for n in cls.linear_names]

    # -- depth changes ---------------------------------------------------------------------------
    def set_blocks(self, blocks: list[nn.Module]) -> None:
        """Replace the block list (drop / repeat), keeping config and KV-cache indices consistent."""
        parent_path, _, attr = self.blocks_path.rpartition(".")
        setattr(self.model.get_submodule(parent_path), attr, nn.ModuleList(blocks))
        old_types = getattr(self.config, "layer_types", None)
        setattr(self.config, self.depth_key, len(blocks))
        if isinstance(old_types, list):
            self.config.layer_types = [old_types[0]] * len(blocks) if len(set(old_types)) == 1 else \
                [getattr(b, "attention_type", old_types[0]) for b in blocks]
        self.renumber()

    def renumber(self) -> None:
        """Give every block's attention its position as ``layer_idx`` (used by the KV cache)."""
        for i, b in enumerate(self.blocks()):
            for m in b.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i


class LlamaArch(Arch):
    """Llama, Mistral, Qwen2/3 and SmolLM: pre-RMSNorm blocks with gated MLP."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
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


ARCHS: tuple[type[Arch], ...] = (LlamaArch, OPTArch)


def arch_class(model_type: str | None) -> type[Arch]:
    """The :class:`Arch` subclass serving ``model_type``; a clear error for unsupported families."""
    for cls in ARCHS:
        if model_type in cls.model_types:
            return cls
    supported = sorted(t for c in ARCHS for t in c.model_types)
    raise FlexiError("model.source", f"model family {model_type!r} is not supported",
                     f"use one of {supported}, or add an Arch subclass in flexigpt/model/arch.py")


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
    return arch_class(d.get("model_type")).facts(d)
