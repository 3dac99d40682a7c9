"""The variant registry: what the stages, the comparison table and the benchmarks read."""
from __future__ import annotations

import pytest

from conftest import make_tiny_llama
from flexigpt import variants
from flexigpt.compress.plan import make_plan
from flexigpt.errors import FlexiError
from flexigpt.model import flexi as fm

RECIPE = variants.Recipe(adapters=variants.AdapterSettings(rank=4))  # tiny models: rank <= 16


def test_registry_holds_the_compared_variants():
    assert list(variants.VARIANTS)[:4] == ["dense", "shortgpt", "lora_baseline", "flexigpt"]
    assert variants.trainable()[:2] == ["lora_baseline", "flexigpt"]
    r = RECIPE
    assert variants.label("lora_baseline", r) == "ShortGPT+LoRA"
    assert not variants.applicable("shortgpt", variants.Recipe(mode="extend"))


def test_a_registered_variant_is_built_like_the_others():
    base = make_tiny_llama()
    plan = make_plan(base, None, ratio=None, blocks=[2, 3], rank=4, progress=False)
    v = variants.register(variants.Variant(
        "flexigpt_no_norm", {"prune": "FlexiGPT, no output norm"}, True, "build",
        lambda r, p, L: fm.prune_spec(p.num_blocks, p.base, r.adapters.lora, output_norm=False)))
    try:
        m = variants.build_variant(base, v.name, RECIPE, plan)
        assert fm.spec_of(m).output_norm is False and fm.spec_of(m).replaced == [2, 3]
        assert v.name in variants.trainable()
        with pytest.raises(FlexiError, match="does not exist in mode"):
            variants.spec_for(v.name, variants.Recipe(mode="extend"), None, 6)
    finally:
        variants.VARIANTS.pop(v.name)


def test_unknown_variant_lists_the_registry():
    with pytest.raises(FlexiError) as e:
        variants.get("llama_tiny")
    assert e.value.param == "variant" and "flexigpt" in e.value.fix


def test_validate_spec_leaves_the_spec_alone():
    base = make_tiny_llama()
    spec = variants.flexigpt_spec(RECIPE, make_plan(base, None, ratio=None, blocks=[2], rank=4,
                                                                progress=False))
    before = spec.to_dict()
    fm.validate_spec(fm.arch_of(base), spec)
    assert spec.to_dict() == before


def test_params_matched_baseline_has_flexigpts_adapter_params():
    from flexigpt.config import Params
    from flexigpt.model.flexi import adapter_params
    from flexigpt.variants import build_variant, matched_prune_rank

    base = make_tiny_llama(n_layers=6, hidden=32)
    plan = make_plan(base, [0.5, 0.1, 0.4, 0.2, 0.9, 0.8], ratio=None, blocks=[1, 3], rank=4)
    p = Params({"mode": "prune", "adapters": {"rank": 4, "lora_on_kept": True}})
    matched = p.with_overrides({"baseline.params_matched": True})
    assert matched_prune_rank(matched, plan) == 6  # round(4 x 6 adapted positions / 4 kept blocks)
    flexi = adapter_params(build_variant(base, "flexigpt", p, plan))
    same = adapter_params(build_variant(base, "lora_baseline", p, plan))
    matched_params = adapter_params(build_variant(base, "lora_baseline", matched, plan))
    assert same < matched_params and abs(matched_params - flexi) / flexi < 0.05
