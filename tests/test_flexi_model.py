"""The FlexiGPT model mechanics on tiny random models (Llama and OPT)."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexigpt.model import checkpoint as compact
from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of
from flexigpt.errors import FlexiError
from conftest import make_tiny_llama, make_tiny_opt


def full_rank_llama(n_layers: int = 6, hidden: int = 32):
    """Tiny Llama without GQA, so every projection is hidden x >=hidden and rank = hidden is full rank."""
    return make_tiny_llama(n_layers, hidden, kv_heads=4, intermediate=hidden + 16)


def models(hidden: int = 32):
    return {"llama": full_rank_llama(hidden=hidden), "opt": make_tiny_opt(n_layers=4, hidden=hidden)}


BASES = {"llama": {2: 1, 4: 5}, "opt": {1: 0, 3: 2}}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_full_rank_svd_diff_reproduces_dense(family, tokens):
    dense = models()[family]
    m = copy.deepcopy(dense)
    fm.build(m, fm.prune_spec(dense.config.num_hidden_layers, BASES[family], fm.LoraSettings(rank=32),
                              output_norm=False))
    with torch.no_grad():
        torch.testing.assert_close(m(tokens).logits, dense(tokens).logits, atol=1e-4, rtol=1e-4)


def test_low_rank_svd_diff_is_between_shortgpt_and_dense(tokens):
    dense = full_rank_llama()
    with torch.no_grad():
        ref = dense(tokens).logits
        errs = []
        for r in (1, 8, 24):
            m = fm.build(copy.deepcopy(dense), fm.prune_spec(6, {2: 1, 4: 5}, fm.LoraSettings(rank=r), output_norm=False))
            errs.append((m(tokens).logits - ref).abs().mean().item())
    assert errs[0] > errs[1] > errs[2] > 0  # more rank, closer to the dense block


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_gamma_zero_reproduces_shortgpt(family, tokens):
    dense = models()[family]
    L = dense.config.num_hidden_layers
    flexi = fm.build(copy.deepcopy(dense), fm.prune_spec(L, BASES[family], fm.LoraSettings(rank=4), gamma_init=0.0))
    short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(L, sorted(BASES[family])))
    assert short.config.num_hidden_layers == L - 2
    with torch.no_grad():
        torch.testing.assert_close(flexi(tokens).logits, short(tokens).logits, atol=1e-5, rtol=1e-5)


def test_shared_storage_and_optimizer_sees_each_tensor_once():
    m = fm.build(full_rank_llama(), fm.prune_spec(6, {2: 1, 4: 5}, fm.LoraSettings(rank=4)))
    a = arch_of(m)
    for p, s in ((2, 1), (4, 5)):
        for (n, wp), ws in zip(a.weights(p).items(), a.weights(s).values()):
            assert wp.data_ptr() == ws.data_ptr(), n
        # pre-norms stay the replaced block's own
        assert a.norms(p)["input_layernorm"].weight.data_ptr() != a.norms(s)["input_layernorm"].weight.data_ptr()
    params = list(m.parameters())
    assert len({q.data_ptr() for q in params}) == len(params)  # parameters() de-duplicates shared tensors
    opt = torch.optim.AdamW(params)
    assert sum(len(g["params"]) for g in opt.param_groups) == len({q.data_ptr() for q in params})
    assert fm.unique_params(m) < fm.unique_params(full_rank_llama()) + fm.adapter_params(m)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_save_load_identical_logits_and_size(family, tmp_path, tokens):
    dense = models(hidden=128)[family]  # big enough that safetensors' JSON headers are noise
    m = fm.build(copy.deepcopy(dense), fm.prune_spec(dense.config.num_hidden_layers, BASES[family],
                                                      fm.LoraSettings(rank=4), gamma_init=0.3))
    with torch.no_grad():
        for n, q in m.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.05)
    compact.save(m, tmp_path / "c")
    back = compact.load(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, m(tokens).logits)
    n_bytes = compact.dir_bytes(tmp_path / "c")
    expected = (fm.unique_params(m)) * 4
    assert abs(n_bytes - expected) / expected < 0.02, (n_bytes, expected)
    assert n_bytes < compact.dir_bytes_of_model(dense)


@pytest.mark.parametrize("family,norm", [("llama", True), ("llama", False), ("opt", True)])
def test_export_loads_with_automodel(family, norm, tmp_path, tokens):
    dense = models()[family]
    m = fm.build(copy.deepcopy(dense), fm.prune_spec(dense.config.num_hidden_layers, BASES[family],
                                                      fm.LoraSettings(rank=4), output_norm=norm, gamma_init=0.2))
    with torch.no_grad():
        for n, q in m.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.05)
    compact.export_plain(m, tmp_path / "e")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "e", trust_remote_code=norm)
    assert (tmp_path / "e" / "modeling_flexigpt.py").exists() == norm
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, m(tokens).logits, atol=1e-5, rtol=1e-5)


def test_generate_after_load(tmp_path, tokens):
    m = fm.build(full_rank_llama(), fm.prune_spec(6, {2: 1}, fm.LoraSettings(rank=4)))
    compact.save(m, tmp_path / "c")
    back = compact.load(tmp_path / "c")
    out = back.generate(tokens[:1], max_new_tokens=4, do_sample=False)
    ref = m.generate(tokens[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref) and out.shape[1] == tokens.shape[1] + 4


# -- bad input ----------------------------------------------------------------------------------

def test_plan_for_other_model():
    with pytest.raises(FlexiError) as e:
        fm.build(full_rank_llama(), fm.prune_spec(8, {2: 1}, fm.LoraSettings(rank=4)))
    assert e.value.param == "plan"


def test_plan_out_of_range_blocks():
    spec = fm.prune_spec(6, {2: 9}, fm.LoraSettings(rank=4))
    with pytest.raises(FlexiError, match="outside"):
        fm.build(full_rank_llama(), spec)


def test_rank_too_large():
    with pytest.raises(FlexiError) as e:
        fm.build(full_rank_llama(), fm.prune_spec(6, {2: 1}, fm.LoraSettings(rank=33)))
    assert e.value.param == "adapters.rank" and "at most 32" in e.value.fix


def test_unknown_targets_lists_valid():
    with pytest.raises(FlexiError) as e:
        fm.build(full_rank_llama(), fm.prune_spec(6, {2: 1}, fm.LoraSettings(rank=4, targets=["query", "q_proj"])))
    assert e.value.param == "adapters.targets" and "gate_proj" in e.value.fix


def test_negative_gamma():
    with pytest.raises(FlexiError) as e:
        fm.build(full_rank_llama(), fm.prune_spec(6, {2: 1}, fm.LoraSettings(rank=4), gamma_init=-0.1))
    assert e.value.param == "norm.gamma_init"


@pytest.fixture
def saved(tmp_path):
    m = fm.build(full_rank_llama(), fm.prune_spec(6, {2: 1}, fm.LoraSettings(rank=4)))
    compact.save(m, tmp_path / "c")
    return tmp_path / "c"


def _edit_adapters(saved, edit, rehash: bool) -> None:
    """Rewrite adapters.safetensors through ``edit``; optionally update the file hash in the manifest."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(saved / "adapters.safetensors"))
    edit(t)
    save_file(t, str(saved / "adapters.safetensors"), metadata={"format": compact.FORMAT})
    if rehash:
        man = json.loads((saved / compact.MANIFEST).read_text())
        man["files"]["adapters.safetensors"] = compact.sha256_file(saved / "adapters.safetensors")
        (saved / compact.MANIFEST).write_text(json.dumps(man))


def _nudge(t):
    k = next(iter(t))
    t[k] = t[k] + 1e-3


def test_tampered_tensor_is_caught(saved):
    _edit_adapters(saved, _nudge, rehash=False)
    with pytest.raises(FlexiError, match="checksum"):
        compact.load(saved)
    _edit_adapters(saved, lambda t: None, rehash=True)  # file hash now matches: the per-tensor checksum still catches it
    with pytest.raises(FlexiError, match="tampered"):
        compact.load(saved)


def test_missing_tensor_is_caught(saved):
    _edit_adapters(saved, lambda t: t.pop(next(iter(t))), rehash=True)
    with pytest.raises(FlexiError, match="missing tensors"):
        compact.load(saved)


def test_missing_file_is_caught(saved):
    (saved / "base.safetensors").unlink()
    with pytest.raises(FlexiError, match="missing"):
        compact.load(saved)
