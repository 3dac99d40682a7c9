"""Block importance (Eq. 1) on tiny random Llama / OPT models: hooks vs direct computation."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_llama, make_tiny_opt
from flexigpt.compress import importance as imp
from flexigpt.model.arch import arch_of
from flexigpt.config import Params
from flexigpt.errors import FlexiError


pytestmark = pytest.mark.usefixtures("one_thread")


def _no_final_norm(model):
    """The same model with its final norm replaced by identity (so hidden_states[-1] is raw)."""
    a = arch_of(model)
    parent, _, attr = a.final_norm_path.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.Identity())
    return model


def _direct_cosines(model, ids) -> torch.Tensor:
    """cos(X_i,t, X_i+1,t) for every block and token, via output_hidden_states on a norm-free model."""
    with torch.no_grad():
        hs = _no_final_norm(model)(ids, output_hidden_states=True).hidden_states
    return torch.stack([F.cosine_similarity(hs[i], hs[i + 1], dim=-1) for i in range(len(hs) - 1)])


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_bi_and_angular_equal_direct_computation(kind, tokens):
    model = make_tiny_llama() if kind == "llama" else make_tiny_opt()
    bi = imp.score_blocks(model, tokens, method="block_influence", dtype="float32", progress=False)
    ang = imp.score_blocks(model, tokens, method="angular", dtype="float32", progress=False)
    cos = _direct_cosines(model, tokens)  # [L, N, T]
    want_bi = (1 - cos.flatten(1).mean(1)).tolist()
    want_ang = (torch.arccos(cos.clamp(-1, 1)) / math.pi).flatten(1).mean(1).tolist()
    assert bi.scores == pytest.approx(want_bi, abs=2e-6)
    assert ang.scores == pytest.approx(want_ang, abs=2e-6)
    assert bi.tokens == tokens.numel() and bi.sequences == tokens.shape[0] and bi.method == "block_influence"


def test_last_block_is_not_scored_after_the_final_norm(tiny_llama, tokens):
    """output_hidden_states[-1] comes after the final norm; the hooks must not see it."""
    res = imp.score_blocks(tiny_llama, tokens, dtype="float32", progress=False)
    with torch.no_grad():
        hs = tiny_llama(tokens, output_hidden_states=True).hidden_states
    naive_last = 1 - F.cosine_similarity(hs[-2], hs[-1], dim=-1).mean().item()
    direct_last = 1 - _direct_cosines(tiny_llama, tokens)[-1].mean().item()
    assert res.scores[-1] == pytest.approx(direct_last, abs=2e-6)
    assert abs(naive_last - direct_last) > 1e-3


@pytest.mark.parametrize("method", ["block_influence", "angular"])
def test_streaming_over_batches_equals_one_batch(tiny_model, method):
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    one = imp.score_blocks(tiny_model, ids, method=method, batch_size=5, dtype="float32", progress=False)
    for bs in (1, 2):
        streamed = imp.score_blocks(tiny_model, ids, method=method, batch_size=bs, dtype="float32", progress=False)
        assert streamed.scores == pytest.approx(one.scores, abs=1e-6)


def test_bf16_autocast_is_close_to_float32(tiny_llama, tokens):
    f32 = imp.score_blocks(tiny_llama, tokens, dtype="float32", progress=False).scores
    b16 = imp.score_blocks(tiny_llama, tokens, dtype="bfloat16", progress=False).scores
    assert b16 == pytest.approx(f32, abs=0.02)


def test_hooks_are_removed_and_nothing_is_held(tiny_llama, tokens):
    a = arch_of(tiny_llama)
    sums = imp.CosineSums(a.num_blocks)
    with imp.cosine_hooks(a, sums):
        assert all(len(b._forward_pre_hooks) == 1 and len(b._forward_hooks) == 1 for b in a.blocks())
        with torch.no_grad():
            tiny_llama(tokens)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in a.blocks())
    assert torch.all(sums.count == tokens.numel())


def test_tuple_block_outputs_use_element_zero():
    """Blocks returning (hidden, extras) tuples are scored on element [0]."""

    class TupleBlock(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, hidden_states):
            return (hidden_states * self.scale + 1.0, "extra")

    class Fake:
        def __init__(self):
            self.list = nn.ModuleList([TupleBlock(2.0), TupleBlock(-1.0)])

        def blocks(self):
            return self.list

    fake = Fake()
    sums = imp.CosineSums(2)
    x = torch.randn(2, 3, 4)
    with imp.cosine_hooks(fake, sums):
        y = x
        for b in fake.list:
            y = b(hidden_states=y)[0] if b is fake.list[1] else b(y)[0]
    y0 = x * 2 + 1
    want0 = 1 - F.cosine_similarity(x, y0, dim=-1).mean().item()
    want1 = 1 - F.cosine_similarity(y0, -y0 + 1, dim=-1).mean().item()
    assert sums.block_influence() == pytest.approx([want0, want1], abs=1e-6)


def test_drop_nll_equals_manual_removal_and_restores_blocks(tiny_llama, tokens):
    a = arch_of(tiny_llama)
    before = list(a.blocks())
    res = imp.score_blocks(tiny_llama, tokens, method="drop_nll", dtype="float32", progress=False)
    assert list(a.blocks()) == before and tiny_llama.config.num_hidden_layers == len(before)
    with torch.no_grad():
        dense = tiny_llama(tokens, labels=tokens).loss.item()
        a.set_blocks(before[:2] + before[3:])
        without2 = tiny_llama(tokens, labels=tokens).loss.item()
        a.set_blocks(before)
    assert res.scores[2] == pytest.approx(without2 - dense, abs=1e-5)
    assert len(res.scores) == len(before)


def test_result_round_trip_and_ranking():
    r = imp.ImportanceResult(scores=[0.3, 0.1, 0.1, 0.5], method="angular", tokens=64, sequences=4, dtype="float32")
    assert r.ranking() == [1, 2, 0, 3]
    assert imp.ImportanceResult.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("kwargs,param", [
    ({"method": "cosine"}, "importance.method"),
    ({"dtype": "float16"}, "importance.dtype"),
    ({"batch_size": 0}, "importance.batch_size"),
    ({"batch_size": True}, "importance.batch_size"),
])
def test_bad_arguments_raise_flexierror(tiny_llama, tokens, kwargs, param):
    with pytest.raises(FlexiError) as e:
        imp.score_blocks(tiny_llama, tokens, progress=False, **kwargs)
    assert e.value.param == param


def test_bad_input_ids_raise_flexierror(tiny_llama):
    with pytest.raises(FlexiError) as e:
        imp.score_blocks(tiny_llama, torch.zeros(8, dtype=torch.long), progress=False)
    assert e.value.param == "paths.data"


# -- the stage's input validation (before any model is loaded) ------------------------------------------
def _score(tmp_path: Path, **importance):
    """What the score_importance stage runs: settings from params, then score_model."""
    data = {"importance": {"method": "block_influence", "batch_size": 8, "dtype": "bfloat16", "n_sequences": None,
                           **importance}}
    return imp.score_model(imp.ImportanceSettings.from_params(Params(data)), tmp_path / "no_model", tmp_path / "data")


def test_stage_missing_calibration_split_names_paths_data(tmp_path):
    with pytest.raises(FlexiError) as e:
        _score(tmp_path)
    assert e.value.param == "paths.data" and "prepare_calibration" in e.value.fix


@pytest.mark.parametrize("override,param", [
    ({"method": "nope"}, "importance.method"),
    ({"batch_size": 0}, "importance.batch_size"),
    ({"dtype": "int8"}, "importance.dtype"),
    ({"n_sequences": 0}, "importance.n_sequences"),
    ({"n_sequences": 99}, "importance.n_sequences"),
])
def test_stage_bad_params_fail_before_loading_the_model(tmp_path, override, param):
    from safetensors.torch import save_file

    (tmp_path / "data").mkdir()
    save_file({"input_ids": torch.zeros(4, 8, dtype=torch.int32)}, str(tmp_path / "data" / "calibration.safetensors"))
    with pytest.raises(FlexiError) as e:  # the model folder does not exist: a later failure would name "model"
        _score(tmp_path, **override)
    assert e.value.param == param
