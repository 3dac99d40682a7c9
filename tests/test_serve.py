"""Serving: self-speculative decoding (identical greedy output, a draft that shares every tensor),
the merged compact format, bad inputs, and the `flexigpt generate` command, on tiny random models."""
import copy
import json

import pytest
import torch

from flexigpt.errors import FlexiError
from flexigpt.model import checkpoint as compact
from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of
from flexigpt.serve import generate, make_draft, make_skip_draft
from conftest import make_tiny_llama, make_tiny_opt

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny forwards: one BLAS thread is fastest
BASE = {2: 1, 5: 6}  # pruned position -> kept block whose weights it shares


def trained_like(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Non-zero LoRA B everywhere (as after training), so kept blocks' LoRA matters when folding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def flexi(gamma: float = 0.3, family: str = "llama", rank: int = 4, alpha: float | None = 8.0):
    """A tiny FlexiGPT (LoRA on every block, alpha != rank so the scaling is not 1)."""
    dense = make_tiny_llama(8, 32, kv_heads=4) if family == "llama" else make_tiny_opt(n_layers=6)
    base = BASE if family == "llama" else {1: 0, 4: 3}
    spec = fm.prune_spec(dense.config.num_hidden_layers, base, fm.LoraSettings(rank=rank, alpha=alpha),
                         gamma_init=gamma, lora_on_kept=True)
    return trained_like(fm.build(dense, spec))


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return flexi()


# -- identical output -------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.3, 1e-3])  # a draft that disagrees often / almost never
def test_speculative_is_identical_to_greedy(gamma):
    m = flexi(gamma)
    rates = []
    for n, new, ks in ((1, 24, (1, 4)), (5, 11, (2, 6)), (17, 30, (3, 5))):  # prompt length, new tokens, K
        ids = prompt(n, seed=n)
        ref, plain = generate(m, ids, new)
        assert ref.shape == (1, n + new) and plain.new_tokens == new and not plain.speculative
        for k in ks:
            out, st = generate(m, ids, new, speculative=True, draft_tokens=k)
            assert torch.equal(out, ref), (n, k)
            assert st.skipped == [2, 5] and st.draft_tokens == k and st.new_tokens == new
            assert st.accepted <= st.drafted and st.rounds == st.new_tokens - st.accepted  # 1 verifier token a round
            rates.append(st.acceptance_rate)
    assert max(rates) > 0  # drafts do get accepted
    if gamma == 1e-3:  # replaced blocks ~ identity: the draft ~ the model
        assert min(rates) > 0.9


def test_speculative_stops_at_eos_like_greedy(model):
    ids = prompt(4, 3)
    ref, _ = generate(model, ids, 30)
    eos = int(ref[0, 4 + 6])  # the 7th new token: both must stop right after it
    a, _ = generate(model, ids, 30, eos_token_id=eos)
    b, _ = generate(model, ids, 30, speculative=True, draft_tokens=4, eos_token_id=eos)
    assert torch.equal(a, b) and int(a[0, -1]) == eos and a.shape[1] <= 4 + 7
    assert model.generation_config.eos_token_id != eos  # the model's own default is left alone


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_dense_skip_draft_is_identical_and_is_shortgpt(family):
    dense = make_tiny_llama(8, 32, kv_heads=4) if family == "llama" else make_tiny_opt(n_layers=6)
    skip = [2, 5] if family == "llama" else [1, 4]
    ids = prompt(6, 4)
    ref, _ = generate(dense, ids, 20)
    for k in (2, 5):
        out, st = generate(dense, ids, 20, speculative=True, draft_tokens=k, skip=skip)
        assert torch.equal(out, ref) and st.skipped == skip
    # the draft alone is ShortGPT (same weights, blocks removed), KV cache and all
    short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(dense.config.num_hidden_layers, skip))
    draft = make_skip_draft(dense, skip)
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, short(ids).logits, rtol=0, atol=0)
        a = draft.generate(ids, max_new_tokens=15, do_sample=False, eos_token_id=None)
        b = short.generate(ids, max_new_tokens=15, do_sample=False, eos_token_id=None)
    assert torch.equal(a, b)


def test_speculative_on_the_merged_form(model):
    merged = compact.merge(model)
    ids = prompt(7, 5)
    ref, _ = generate(merged, ids, 20)
    out, st = generate(merged, ids, 20, speculative=True, draft_tokens=3)
    assert torch.equal(out, ref) and st.skipped == [2, 5]


# -- the draft shares everything ---------------------------------------------------------------------

def test_draft_shares_every_tensor_and_leaves_the_model_alone(model):
    arch = arch_of(model)
    draft = make_draft(model)
    mine = {id(t) for t in [*model.parameters(), *model.buffers()]}
    ptrs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    theirs = [*draft.parameters(), *draft.buffers()]
    assert theirs and all(id(t) in mine for t in theirs)  # the same tensor objects: nothing copied
    assert {t.data_ptr() for t in theirs} <= ptrs
    assert fm.unique_params(draft) < fm.unique_params(model)  # and fewer of them: the skipped positions' own
    modules = {id(m) for m in model.modules()}
    leaves = [m for m in draft.modules() if not list(m.children())]
    assert leaves and all(id(m) in modules for m in leaves)  # linears, norms, LoRA, rotary: shared
    d_arch = arch_of(draft)
    assert d_arch.num_blocks == draft.config.num_hidden_layers == 6
    for j, i in enumerate([0, 1, 3, 4, 6, 7]):  # kept blocks, in the draft's own cache slots
        assert d_arch.blocks()[j].self_attn.layer_idx == j
        assert d_arch.blocks()[j].mlp is arch.blocks()[i].mlp
        assert d_arch.blocks()[j].self_attn.q_proj is arch.blocks()[i].self_attn.q_proj
    # the model is unchanged: its depth, cache slots, config and spec
    assert [b.self_attn.layer_idx for b in arch.blocks()] == list(range(8))
    assert model.config.num_hidden_layers == 8 and fm.spec_of(model).replaced == [2, 5]
    assert fm.spec_of(draft) is None and draft.flexigpt_draft == {"skipped": [2, 5], "kept": [0, 1, 3, 4, 6, 7]}


# -- the merged form ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "opt"])
def test_merged_logits_equal_and_both_forms_load(family, tmp_path, tokens):
    m = flexi(family=family)
    merged = compact.merge(m)
    assert compact.form_of(merged) == "merged" and compact.form_of(m) == "unmerged"
    spec = fm.spec_of(merged)
    assert spec.lora_positions == fm.spec_of(m).replaced and spec.lora.rank == 8 and spec.lora.scaling == 1.0
    kept = [p for p in range(len(spec.sources)) if p not in spec.replaced]
    assert not any(hasattr(mod, "lora_A") for p in kept for mod in arch_of(merged).linears(p).values())
    with torch.no_grad():
        ref = m(tokens).logits
        torch.testing.assert_close(merged(tokens).logits, ref, atol=2e-5, rtol=1e-4)
        for form, flag in (("unmerged", False), ("merged", True)):
            compact.save(m, tmp_path / form, merged=flag)
            back = compact.load(tmp_path / form)
            assert compact.form_of(back) == form
            torch.testing.assert_close(back(tokens).logits, ref, atol=2e-5, rtol=1e-4)
    man = json.loads((tmp_path / "merged" / compact.MANIFEST).read_text())
    assert man["form"] == "merged" and man["merged_from"] == fm.spec_of(m).to_dict()
    assert "form" not in json.loads((tmp_path / "unmerged" / compact.MANIFEST).read_text())
    # export is unchanged: the same per-position plain weights from either form
    a, b = compact.merged_state(m), compact.merged_state(merged)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_form_sizes_and_nothing_to_fold(model):
    sizes = compact.form_sizes(model)
    u, m = sizes["unmerged"], sizes["merged"]
    assert m["stored_params"] < u["stored_params"] and m["bytes"] < u["bytes"]
    # 21 kept-block LoRAs of rank r folded away, 2 replaced positions' rank r -> 2r
    assert u["adapter_params"] - m["adapter_params"] == u["stored_params"] - m["stored_params"]
    no_kept_lora = fm.build(make_tiny_llama(8, 32, kv_heads=4), fm.prune_spec(8, BASE, fm.LoraSettings(rank=4)))
    assert compact.merge(no_kept_lora) is no_kept_lora  # nothing to fold: already its own merged form
    with pytest.raises(FlexiError) as e:
        compact.merge(make_tiny_llama())
    assert e.value.param == "checkpoint"


# -- bad inputs ----------------------------------------------------------------------------------------

def _param(fn) -> FlexiError:
    with pytest.raises(FlexiError) as e:
        fn()
    assert e.value.fix
    return e.value


def test_bad_generate_inputs(model):
    ids = prompt(5, 0)
    dense = make_tiny_llama(8, 32, kv_heads=4)
    short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(8, [2, 5]))
    assert _param(lambda: generate(model, ids, 8, speculative=True, draft_tokens=0)).param == "draft_tokens"
    assert _param(lambda: generate(model, ids, 0)).param == "max_new_tokens"
    for plain in (dense, short):
        e = _param(lambda: generate(plain, ids, 8, speculative=True))
        assert e.param == "speculative" and "skip" in e.fix
    assert _param(lambda: generate(model, prompt(128, 0), 1)).param == "prompt"      # context is 128
    e = _param(lambda: generate(model, prompt(120, 0), 9, speculative=True))
    assert e.param == "max_new_tokens" and "at most 8" in e.fix
    for sampling in ({"do_sample": True}, {"temperature": 0.7}, {"top_p": 0.9}, {"num_beams": 4}):
        e = _param(lambda: generate(model, ids, 8, speculative=True, **sampling))
        assert e.param == "sampling" and "greedy" in e.problem
    generate(model, ids, 2, do_sample=False, num_beams=1)  # greedy spelled out is fine
    assert _param(lambda: generate(dense, ids, 8, speculative=True, skip=[2, 99])).param == "skip"
    assert _param(lambda: generate(dense, ids, 8, speculative=True, skip=list(range(8)))).param == "skip"
    assert _param(lambda: generate(model, ids.repeat(2, 1), 8, speculative=True)).param == "prompt"
    assert _param(lambda: generate(model, ids.float(), 8)).param == "prompt"


@pytest.mark.parametrize("content", ['{"format": "flexigpt-compact/1", "spec": {"sour', "\x00\xff garbage",
                                     "[1, 2]", '{"format": "flexigpt-compact/1"}',
                                     '{"format": "flexigpt-compact/1", "spec": {"sources": [0]}, "tensors": {}, '
                                     '"files": {}}'])
def test_corrupt_manifest_is_a_clean_error(content, tmp_path):
    m = fm.build(make_tiny_llama(4, 16), fm.prune_spec(4, {1: 0}, fm.LoraSettings(rank=2)))
    compact.save(m, tmp_path / "c")
    (tmp_path / "c" / compact.MANIFEST).write_bytes(content.encode("latin-1"))
    e = _param(lambda: compact.load(tmp_path / "c"))
    assert e.param == "checkpoint" and compact.MANIFEST in e.problem


# -- the command -------------------------------------------------------------------------------------

def test_generate_command(model, tmp_path, capsys):
    from flexigpt.pipeline.cli import main
    from helpers import make_tokenizer

    tok = make_tokenizer()
    compact.save(model, tmp_path / "c", tokenizer=tok, merged=True)
    argv = ["generate", "--model", str(tmp_path / "c"), "--prompt", "the quick brown fox", "--max-new-tokens", "12"]
    main(argv)
    plain = capsys.readouterr()
    main(argv + ["--speculative", "--draft-tokens", "3"])
    spec = capsys.readouterr()
    assert spec.out == plain.out and plain.out.strip()
    assert "accepted" in spec.err and "K=3" in spec.err
    for extra, flag in ((["--speculative", "--draft-tokens", "0"], "--draft-tokens"),
                        (["--temperature", "0.7"], "--temperature"), (["--max-new-tokens", "500"], "--max-new-tokens"),
                        (["--skip", "2,x"], "--skip")):
        with pytest.raises(SystemExit) as e:
            main(argv + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and "fix:" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"])
    assert "--model" in capsys.readouterr().err


# -- the real model --------------------------------------------------------------------------------------

def test_variant_speed_record_has_ratios_and_checks_identity(model):
    """The evaluate stage's speed record: keys and the identity check (timings themselves are not asserted)."""
    from flexigpt.serve.speed import variant_speed

    dense = make_tiny_llama(8, 32, kv_heads=4)
    rec = variant_speed(model, dense, prompt(80, 3), repeats=1)
    assert {"forward_vs_dense", "decode_time_vs_dense", "merged_forward_vs_dense",
            "speculative_speedup"} <= set(rec)
    assert rec["speculative_identical"] is True and all(v > 0 for v in rec.values() if not isinstance(v, bool))
    short = fm.build(make_tiny_llama(8, 32, kv_heads=4), fm.shortgpt_spec(8, [2, 5]))
    plain = variant_speed(short, dense, prompt(80, 3), repeats=1)
    assert "speculative_speedup" not in plain and "merged_forward_vs_dense" not in plain


@pytest.mark.e2e
def test_speculative_identical_on_the_embedded_model():
    """SmolLM2-135M as a small FlexiGPT (3 replaced blocks, LoRA everywhere): 20 greedy tokens, identical."""
    from flexigpt.model import importer as mi

    base, tok = mi.load_source(mi.resolve_source("smollm2-135m"))
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    dense_ref, _ = generate(base, ids, 20)
    out, st = generate(base, ids, 20, speculative=True, draft_tokens=4, skip=[20, 24, 26])
    assert torch.equal(out, dense_ref) and st.drafted > 0
    torch.manual_seed(0)
    m = fm.build(base, fm.prune_spec(30, {20: 19, 24: 23, 26: 25}, fm.LoraSettings(rank=8), lora_on_kept=True))
    trained_like(m, scale=0.01)
    ref, _ = generate(m, ids, 20)
    for k in (2, 5):
        out, st = generate(m, ids, 20, speculative=True, draft_tokens=k)
        assert torch.equal(out, ref), k
    merged = compact.merge(m)
    ref_m, _ = generate(merged, ids, 20)
    out, st = generate(merged, ids, 20, speculative=True, draft_tokens=4)
    assert torch.equal(out, ref_m) and st.acceptance_rate > 0
