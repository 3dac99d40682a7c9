"""One invariant suite over every supported model family (tiny random configs from ``tests/families.py``)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from families import ALT, BY_NAME, FAMILIES, HIDDEN, VOCAB, make_model, matrix, readme_section, README
from flexigpt.errors import FlexiError
from flexigpt.model import checkpoint as compact
from flexigpt.model import flexi as fm
from flexigpt.model.arch import ARCHS, Gemma2Arch, GPT2Arch, LAYER_TYPE, arch_class, arch_for_config, arch_of
from flexigpt.model.selftest import self_test

NAMES = [f.model_types[0] for f in FAMILIES]
TYPED = [f.model_types[0] for f in FAMILIES if f.layer_types]
BASES = {1: 0, 3: 2}  # prune positions 1 and 3 (a full-attention position each, in ALT) onto 0 and 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny matrices run fastest on one thread


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB - 4, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def pruned(family: str, *, rank: int = 4, gamma: float = 1e-3, norm: bool = True):
    dense = make_model(BY_NAME[family])
    m = fm.build(copy.deepcopy(dense), fm.prune_spec(4, BASES, fm.LoraSettings(rank=rank), output_norm=norm,
                                                      gamma_init=gamma))
    return dense, m


def randomise_adapters(m):
    with torch.no_grad():
        for n, q in m.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.05)


def test_every_registered_family_is_in_the_table():
    assert {t for c in ARCHS for t in c.model_types} == {t for f in FAMILIES for t in f.model_types}


@pytest.mark.parametrize("family", NAMES)
def test_full_rank_svd_diff_reproduces_dense(family, ids):
    dense, m = pruned(family, rank=HIDDEN, norm=False)
    torch.testing.assert_close(logits(m, ids), logits(dense, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", NAMES)
def test_gamma_zero_reproduces_shortgpt(family, ids):
    dense, flexi = pruned(family, gamma=0.0)
    short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(4, sorted(BASES)))
    torch.testing.assert_close(logits(flexi, ids), logits(short, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", NAMES)
def test_weight_sharing_by_data_ptr(family):
    _, m = pruned(family)
    a = arch_of(m)
    for p, s in BASES.items():
        for n, w in a.weights(p).items():
            assert w.data_ptr() == a.weights(s)[n].data_ptr(), n
        for n, norm in a.norms(p).items():  # norms stay the position's own
            assert norm.weight.data_ptr() != a.norms(s)[n].weight.data_ptr(), n


@pytest.mark.parametrize("family", NAMES)
def test_compact_save_load_equal_logits(family, ids, tmp_path):
    _, m = pruned(family, gamma=0.3)
    randomise_adapters(m)
    compact.save(m, tmp_path / "c")
    back = compact.load(tmp_path / "c")
    torch.testing.assert_close(logits(back, ids), logits(m, ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", NAMES)
def test_export_loads_with_automodel(family, ids, tmp_path):
    _, m = pruned(family, gamma=0.3)
    randomise_adapters(m)
    compact.export_plain(m, tmp_path / "e")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "e", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(back, ids), logits(m, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", NAMES)
def test_extension_at_gamma_zero_equals_base(family, ids, tmp_path):
    dense = make_model(BY_NAME[family])
    ext = fm.build(copy.deepcopy(dense), fm.extend_spec(4, 1, 2, "block", 2, fm.LoraSettings(rank=4), gamma_init=0.0))
    assert arch_of(ext).num_blocks == 6
    torch.testing.assert_close(logits(ext, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", NAMES)
def test_one_training_step(family, ids):
    _, m = pruned(family)
    m.train()
    for n, q in m.named_parameters():
        q.requires_grad_(fm.is_adapter_param(n))
    params = [q for q in m.parameters() if q.requires_grad]
    before = [q.detach().clone() for q in params]
    out = m(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    torch.optim.AdamW(params, lr=1e-2).step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, q) for b, q in zip(before, params) if q.grad is not None)
    assert sum(q.grad is not None for q in params) > 0


@pytest.mark.parametrize("family", TYPED)
def test_layer_types_survive_pruning_and_extension(family, ids, tmp_path):
    dense = make_model(BY_NAME[family])
    _, flexi = pruned(family)
    assert arch_of(flexi).layer_types() == ALT  # replaced positions keep their own type
    short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(4, [0]))
    assert arch_of(short).layer_types() == ALT[1:]
    ext = fm.build(copy.deepcopy(dense), fm.extend_spec(4, 1, 2, "block", 2, fm.LoraSettings(rank=4)))
    assert arch_of(ext).layer_types() == [ALT[0], ALT[1], ALT[1], ALT[2], ALT[2], ALT[3]]
    for m in (flexi, short, ext):
        a = arch_of(m)
        for i, b in enumerate(a.blocks()):
            assert getattr(b, LAYER_TYPE) == a.layer_types()[i]
            assert b.get_submodule("self_attn").layer_type == a.layer_types()[i]
    # a model built from the shortened config with the kept weights runs exactly as the shortened one
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(short.config)).eval()
    fresh.load_state_dict(short.state_dict())
    torch.testing.assert_close(logits(fresh, ids), logits(short, ids), atol=1e-6, rtol=1e-6)
    arch_of(fresh).config.layer_types = ["full_attention"] * 3  # and the pattern matters (window < length)
    assert not torch.allclose(logits(fresh, ids), logits(short, ids), atol=1e-4)


@pytest.mark.parametrize("family", NAMES)
def test_self_test_passes(family):
    out = self_test(make_model(BY_NAME[family]))
    assert out["gamma0_vs_shortgpt"] < 1e-4 and out["svd_init_rel_err"] < 1e-3


class HookedBeforePostNorm(Gemma2Arch):
    """The Gemma bug: output norms on self_attn / mlp, before the sandwich post-norms."""

    attn_residual, mlp_residual = "self_attn", "mlp"


class ConvWeightsUntransposed(GPT2Arch):
    """The GPT-2 bug: Conv1D weights read as stored (in x out)."""

    def weights(self, i):
        return {n: getattr(m, "base_layer", m).weight for n, m in self.linears(i).items()}


class LosesLayerTypes(Gemma2Arch):
    """The old set_blocks bug: every position gets the first layer type after a depth change."""

    def set_blocks(self, blocks):
        super().set_blocks(blocks)
        self.config.layer_types = [self.config.layer_types[0]] * len(blocks)


@pytest.mark.parametrize("family,wrong,match", [("gemma2", HookedBeforePostNorm, "RMS"),
                                                ("gpt2", ConvWeightsUntransposed, "layout"),
                                                ("gemma2", LosesLayerTypes, "layer types")])
def test_self_test_fails_on_a_wrong_seam(family, wrong, match):
    with pytest.raises(FlexiError, match=match) as e:
        self_test(make_model(BY_NAME[family]), arch_cls=wrong)
    assert e.value.param == "model.source" and "flexigpt/model/arch.py" in e.value.fix


@pytest.mark.parametrize("family", NAMES)
def test_streamed_equals_in_memory(family, ids, tmp_path):
    from flexigpt.compress.importance import _streamed_nll
    from flexigpt.model.forward import mean_nll
    from flexigpt.model.stream import StreamedModel

    dense = make_model(BY_NAME[family])
    dense.save_pretrained(tmp_path / "m", safe_serialization=True)
    sm = StreamedModel(tmp_path / "m")
    for i in (0, 3):
        for n, w in arch_of(dense).weights(i).items():
            assert torch.equal(sm.weights(i)[n], w), n
    order = [0, 2, 3]  # a dropped block: each position keeps its own layer type
    got = _streamed_nll(sm, ids, order, batch_size=2, dtype="float32")
    a = arch_of(dense)
    blocks = list(a.blocks())
    a.set_blocks([blocks[i] for i in order])
    ref = mean_nll(dense, ids, batch_size=2, dtype="float32")
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", NAMES)
def test_skip_draft_equals_shortgpt(family, ids):
    from flexigpt.serve.speculative import make_skip_draft

    dense = make_model(BY_NAME[family])
    draft = make_skip_draft(dense, [0])  # shares every tensor; its own (text) config with the kept layer types
    short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(4, [0]))
    torch.testing.assert_close(logits(draft, ids), logits(short, ids), atol=1e-6, rtol=1e-6)
    assert arch_of(dense).num_blocks == 4 and arch_of(draft).layer_types() == arch_of(short).layer_types()


# -- the seam's API -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", NAMES)
def test_facts_and_layer_types_from_a_config_dict(family):
    f = BY_NAME[family]
    d = f.config().to_dict()
    cls = arch_for_config(d)
    facts = cls.facts(d)
    assert (facts.model_type, facts.num_blocks, facts.hidden_size) == (family, 4, HIDDEN)
    assert cls.config_layer_types(d) == (ALT if f.layer_types else None)


def test_config_layer_types_default_pattern_without_layer_types():
    d = BY_NAME["gemma2"].config().to_dict()
    d.pop("layer_types")
    assert arch_class("gemma2").config_layer_types(d) == ALT  # transformers' own alternating default
    assert arch_class("llama").config_layer_types(BY_NAME["llama"].config().to_dict()) is None


@pytest.mark.parametrize("cfg", [{"model_type": "bert"}, {"model_type": "t5", "is_encoder_decoder": True},
                                 {"model_type": "whatever", "is_encoder_decoder": True}])
def test_encoder_models_are_refused(cfg):
    with pytest.raises(FlexiError, match="decoder-only") as e:
        arch_for_config(cfg)
    assert e.value.param == "model.source"


def test_unknown_family_names_it_and_the_guide():
    with pytest.raises(FlexiError) as e:
        arch_for_config({"model_type": "mamba"})
    assert "'mamba'" in e.value.problem and "flexigpt/model/arch.py" in e.value.fix and "gpt2" in e.value.fix


def test_unfused_target_names_the_fused_one():
    with pytest.raises(FlexiError) as e:
        fm.build(make_model(BY_NAME["phi3"]), fm.prune_spec(4, BASES, fm.LoraSettings(rank=4, targets=["q_proj"])))
    assert e.value.param == "adapters.targets" and "qkv_proj" in e.value.problem and "gate_up_proj" in e.value.fix


def test_gpt2_targets_are_unique_suffixes_and_inject_exactly():
    assert GPT2Arch.target_names() == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    m = fm.build(make_model(BY_NAME["gpt2"]), fm.prune_spec(4, BASES, fm.LoraSettings(rank=4, targets=["mlp.c_proj"])))
    wrapped = sorted(n.split(".", 3)[-1] for n, mod in m.named_modules() if hasattr(mod, "lora_A"))
    assert wrapped == ["mlp.c_proj", "mlp.c_proj"]


def test_blocks_of_different_shapes_are_refused():
    m = make_model(BY_NAME["llama"])
    arch_of(m).blocks()[2].mlp.up_proj = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
    with pytest.raises(FlexiError, match="same matrices and shapes"):
        fm.build(m, fm.prune_spec(4, BASES, fm.LoraSettings(rank=4)))


def test_gguf_column_follows_transformers_gguf_loader():
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    for f in FAMILIES:
        if f.model_types[0] != "gemma3":  # a GGUF holds Gemma 3's text model (the gemma3_text row)
            assert f.gguf == (f.model_types[0].removesuffix("_text") in GGUF_CONFIG_MAPPING), f.name


def test_readme_matrix_is_up_to_date():
    assert readme_section(README.read_text()) == matrix(), "run: python tests/families.py --write"
