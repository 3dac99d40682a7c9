"""The architecture seam's contract, checked on a tiny random model of every registered family."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_opt
from families import FAMILIES, make_model
from flexigpt.errors import FlexiError
from flexigpt.model.arch import ARCHS, Arch, arch_class, arch_of, facts_of

# the conftest models for Llama / OPT, the tiny configs of tests/families.py for every other family
TINY = {**{f.model_types[0]: (lambda f=f: make_model(f)) for f in FAMILIES}, "llama": make_tiny_llama, "opt": make_tiny_opt}


def test_every_registered_family_has_a_tiny_model_here():
    assert {t for c in ARCHS for t in c.model_types} >= set(TINY)
    for cls in ARCHS:
        assert any(t in TINY for t in cls.model_types), f"{cls.__name__} has no invariant test model"


def test_a_family_missing_a_required_name_fails_at_class_definition():
    with pytest.raises(TypeError, match="attn_residual"):
        class Broken(Arch):  # noqa: F841
            model_types = ("x",)
            blocks_path = "model.layers"
            linear_names = ("q",)
            norm_names = ("n",)
            mlp_residual = "mlp"
            embed_path = final_norm_path = backbone_path = head_path = "x"


def test_unsupported_family_names_the_param_and_the_seam():
    with pytest.raises(FlexiError) as e:
        arch_class("mamba")
    assert e.value.param == "model.source" and "flexigpt/model/arch.py" in e.value.fix


@pytest.mark.parametrize("family", sorted(TINY))
def test_facts_from_config_and_folder_agree_with_the_model(family, tmp_path):
    model = TINY[family]()
    arch = arch_of(model)
    cfg = arch.config  # the text config of a multimodal model
    assert arch.num_blocks == cfg.num_hidden_layers == len(arch.blocks())
    assert arch.hidden_size == cfg.hidden_size and arch.max_positions == cfg.max_position_embeddings
    q = arch.weights(0)[arch.linear_names[0]]
    # q_proj's output width is heads x head_dim (fused qkv: 3x that, the tiny models have no GQA)
    assert q.shape[0] == (3 if arch.unfused.get("q_proj") else 1) * arch.attention_width
    model.config.to_json_file(tmp_path / "config.json")
    assert facts_of(tmp_path) == arch.facts(model.config)
    stored = arch.text_config(json.loads((tmp_path / "config.json").read_text()))
    assert facts_of(tmp_path).num_blocks == stored[arch.depth_key]


@pytest.mark.parametrize("family", sorted(TINY))
def test_backbone_and_head_give_the_model_logits(family):
    model = TINY[family]()
    arch = arch_of(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = arch.backbone()(input_ids=ids).last_hidden_state
        assert torch.allclose(arch.logits(h), model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY))
def test_residual_outputs_are_exactly_what_joins_the_residual(family):
    """Zeroing the outputs of the two residual modules turns every block into the identity."""
    model = TINY[family]()
    arch = arch_of(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def zero(_m, _a, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    handles = [m.register_forward_hook(zero) for i in range(arch.num_blocks) for m in arch.residual_outputs(i).values()]
    for i, b in enumerate(arch.blocks()):
        def grab(_m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x, out[0] if isinstance(out, tuple) else out)
        handles.append(b.register_forward_hook(grab, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1)))
    for h in handles:
        h.remove()
    assert len(seen) == arch.num_blocks
    for x, y in seen.values():
        assert torch.equal(x, y)


@pytest.mark.parametrize("family", sorted(TINY))
def test_set_blocks_keeps_config_and_cache_indices_consistent(family):
    model = TINY[family]()
    arch = arch_of(model)
    blocks = list(arch.blocks())
    arch.set_blocks(blocks[:2] + [copy.deepcopy(blocks[1])] + blocks[2:])  # a repeat of block 1, as extend builds it
    assert arch.num_blocks == len(blocks) + 1 == arch.facts(model.config).num_blocks
    idx = [m.layer_idx for b in arch.blocks() for m in b.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == list(range(arch.num_blocks))
