"""Model extension: repeated blocks share weights, start as the base model, bad ranges are refused."""
import copy

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_opt
from flexigpt.model import checkpoint as compact
from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of
from flexigpt.errors import FlexiError


def test_patterns_layout():
    block = fm.extend_spec(6, 2, 3, "block", 2, fm.LoraSettings(rank=4))
    assert block.sources == [0, 1, 2, 2, 3, 3, 4, 5] and block.replaced == [3, 5]
    seq = fm.extend_spec(6, 2, 3, "sequential", 3, fm.LoraSettings(rank=4))
    assert seq.sources == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5] and seq.replaced == [4, 5, 6, 7]
    assert block.lora.init == "zeros" and block.output_norm


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt])
@pytest.mark.parametrize("pattern", ["block", "sequential"])
def test_extended_model_starts_as_base(make, pattern, tokens):
    base = make()
    L = base.config.num_hidden_layers
    ext = fm.build(copy.deepcopy(base), fm.extend_spec(L, 1, 2, pattern, 2, fm.LoraSettings(rank=4), gamma_init=1e-4))
    assert ext.config.num_hidden_layers == L + 2
    with torch.no_grad():
        ref = base(tokens).logits
        out = ext(tokens).logits
    torch.testing.assert_close(out, ref, atol=5e-3, rtol=1e-3)
    exact = fm.build(copy.deepcopy(base), fm.extend_spec(L, 1, 2, pattern, 2, fm.LoraSettings(rank=4), gamma_init=0.0))
    with torch.no_grad():
        torch.testing.assert_close(exact(tokens).logits, ref, atol=1e-5, rtol=1e-5)


def test_repeats_share_storage_and_roundtrip(tmp_path, tokens):
    base = make_tiny_llama()
    spec = fm.extend_spec(6, 2, 3, "block", 2, fm.LoraSettings(rank=4), gamma_init=0.1)
    ext = fm.build(copy.deepcopy(base), spec)
    a = arch_of(ext)
    for p in spec.replaced:
        src = spec.sources[p]
        first = spec.sources.index(src)
        for wp, ws in zip(a.weights(p).values(), a.weights(first).values()):
            assert wp.data_ptr() == ws.data_ptr()
        assert a.blocks()[p].self_attn.layer_idx == p  # own KV-cache slot
    assert fm.unique_params(ext) == fm.unique_params(base) + fm.adapter_params(ext) + 2 * 2 * 32  # + own pre-norms
    compact.save(ext, tmp_path / "c")
    back = compact.load(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ext(tokens).logits)
    assert ext.generate(tokens[:1], max_new_tokens=3, do_sample=False).shape[1] == tokens.shape[1] + 3


@pytest.mark.parametrize("args,param", [
    ((6, 4, 9, "block", 2), "extend.start"),     # out of bounds
    ((6, -1, 2, "block", 2), "extend.start"),
    ((6, 3, 2, "block", 2), "extend.start"),     # start > end
    ((6, 1, 2, "block", 0), "extend.repeats"),   # k < 1
    ((6, 1, 2, "zigzag", 2), "extend.pattern"),
])
def test_bad_ranges(args, param):
    with pytest.raises(FlexiError) as e:
        fm.extend_spec(*args, fm.LoraSettings(rank=4))
    assert e.value.param == param


def test_unreachable_target_depth():
    with pytest.raises(FlexiError) as e:
        fm.extend_spec(6, 1, 3, "block", 2, fm.LoraSettings(rank=4), target_depth=8)
    assert e.value.param == "extend.target_depth" and "depth 9" in e.value.problem
