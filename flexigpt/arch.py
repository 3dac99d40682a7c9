"""Model adapters: the one seam that knows an architecture's module names.

Everything else in flexigpt is model-agnostic and talks to a :class:`ModelAdapter`, which
exposes blocks, their linear weights, their norms, the embeddings and the head (the idea of
SliceGPT's ``ModelAdapter``). Add a family by subclassing and registering its ``model_type``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .errors import FlexiError


class ModelAdapter:
    """Architecture specifics for one transformers model instance."""

    model_types: ClassVar[tuple[str, ...]] = ()
    blocks_path: ClassVar[str]              # dotted path of the ModuleList of blocks
    linear_names: ClassVar[tuple[str, ...]]  # block-relative names of the adaptable linears
    norm_names: ClassVar[tuple[str, ...]]    # block-relative names of the pre-norms
    attn_out_name: ClassVar[str]             # last linear of the attention sublayer
    mlp_out_name: ClassVar[str]              # last linear of the MLP sublayer
    embed_path: ClassVar[str]
    final_norm_path: ClassVar[str]
    head_path: ClassVar[str] = "lm_head"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- structure -----------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

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

    def embeddings(self) -> nn.Module:
        return self.model.get_submodule(self.embed_path)

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.final_norm_path)

    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    def linear_module_name(self, i: int, name: str) -> str:
        """Fully qualified module name of linear ``name`` in block ``i`` (for PEFT targets)."""
        return f"{self.blocks_path}.{i}.{name}"

    # -- depth changes ---------------------------------------------------------------------
    def set_blocks(self, blocks: list[nn.Module]) -> None:
        """Replace the block list (drop / repeat), keeping config and KV-cache indices consistent."""
        parent_path, _, attr = self.blocks_path.rpartition(".")
        setattr(self.model.get_submodule(parent_path), attr, nn.ModuleList(blocks))
        old_types = getattr(self.config, "layer_types", None)
        self.config.num_hidden_layers = len(blocks)
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


class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2/3 and SmolLM: pre-RMSNorm blocks with gated MLP."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    blocks_path = "model.layers"
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    norm_names = ("input_layernorm", "post_attention_layernorm")
    attn_out_name = "self_attn.o_proj"
    mlp_out_name = "mlp.down_proj"
    embed_path = "model.embed_tokens"
    final_norm_path = "model.norm"


class OPTAdapter(ModelAdapter):
    """OPT: pre-LayerNorm blocks (for the 125m..175B checkpoints) with fc1/fc2 MLP."""

    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    norm_names = ("self_attn_layer_norm", "final_layer_norm")
    attn_out_name = "self_attn.out_proj"
    mlp_out_name = "fc2"
    embed_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, OPTAdapter)


def short_linear_names(adapter: ModelAdapter) -> list[str]:
    """Leaf names (``q_proj``…) of the adaptable linears, as users write LoRA targets."""
    return [n.rsplit(".", 1)[-1] for n in adapter.linear_names]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model.config.model_type``; a clear error for unsupported families."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if mt in cls.model_types:
            return cls(model)
    supported = sorted(t for c in ADAPTERS for t in c.model_types)
    raise FlexiError("model.source", f"model family {mt!r} is not supported",
                     f"use one of {supported}, or add a ModelAdapter subclass in flexigpt/arch.py")
