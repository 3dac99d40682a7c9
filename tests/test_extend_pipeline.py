"""Extend mode end to end on a tiny model: params -> svd_init -> training -> evaluate -> compare."""
import copy
import json
import os
from pathlib import Path

import pytest

from conftest import make_tiny_llama
from flexigpt.model import flexi as fm
from flexigpt.config import Params
from flexigpt.errors import FlexiError
from flexigpt.variants import applicable, build_variant, matched_rank, spec_for
from helpers import assert_clean_error, run_stage, save_tiny_model_dir, tiny_project_params

EXT = {"mode": "extend", "extend": {"start": 1, "end": 3, "pattern": "block", "repeats": 2, "target_depth": None}}


def params(**over) -> Params:
    p = Params({"mode": "extend", "extend": dict(EXT["extend"]),
                "adapters": {"rank": 8, "alpha": None, "targets": ["all"], "init": "svd_diff"},
                "norm": {"enabled": True, "gamma_init": 0.001}})
    return p.with_overrides(over)


def test_extend_mode_variants_and_matched_baseline():
    base = make_tiny_llama()
    p = params()
    ext = build_variant(base, "flexigpt", p, None)
    assert len(ext.model.layers) == 9                      # blocks 1..3 each twice: 6 + 3
    lora = build_variant(base, "lora_baseline", p, None)
    assert len(lora.model.layers) == 6
    # matched rank: 8 x 3 repeats / 6 blocks = 4, so the adapter counts are equal
    assert matched_rank(p, 6) == 4
    assert fm.adapter_params(lora) == pytest.approx(fm.adapter_params(ext), rel=0.02)
    assert not applicable("shortgpt", p)
    with pytest.raises(FlexiError, match="does not exist in mode"):
        spec_for("shortgpt", p, None, 6)


def test_extend_mode_bad_params():
    for over, param in [({"extend.start": 7}, "extend.start"), ({"extend.start": 3, "extend.end": 1}, "extend.start"),
                        ({"extend.repeats": 0}, "extend.repeats"), ({"extend.target_depth": 10}, "extend.target_depth"),
                        ({"mode": "grow"}, "mode")]:
        with pytest.raises(FlexiError) as e:
            spec_for("flexigpt", params(**over), None, 6)
        assert e.value.param == param


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extend")
    os.environ["FLEXIGPT_TEST_MLFLOW_DB"] = str(tmp / "mlflow.db")
    model_dir = save_tiny_model_dir(tmp / "base_model", make_tiny_llama(vocab=128))
    p = tiny_project_params(tmp, model_dir, train_tokens=128)
    p.update(copy.deepcopy(EXT))
    p["adapters"]["rank"] = 4
    p["train"].update(batch_size=4, micro_batch=2, token_budget=4 * 16 * 2, warmup_steps=1)
    p["svd_init"]["batch_size"] = 2
    res = run_stage("prepare_calibration", p, tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    yield tmp, p
    os.environ.pop("FLEXIGPT_TEST_MLFLOW_DB", None)


def test_svd_init_extends_and_starts_as_base(tiny_project):
    tmp, p = tiny_project
    res = run_stage("svd_init", p, tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(Path(p["paths"]["svd_init_metrics"]).read_text())
    assert m["mode"] == "extend" and (m["depth_before"], m["depth_after"]) == (6, 9)
    assert "shortgpt" not in m
    assert m["start_ppl_vs_dense"] == pytest.approx(1.0, abs=0.02)  # small γ, zero adapters
    assert 0 < m["param_overhead_vs_dense"] < 0.5


def test_train_both_extend_variants(tiny_project):
    tmp, p = tiny_project
    if not (Path(p["paths"]["flexigpt_init"]) / "flexigpt.json").is_file():
        assert run_stage("svd_init", p, tmp).returncode == 0
    counts = {}
    for variant in ("flexigpt", "lora_baseline"):
        res = run_stage("train_adapters", p, tmp, args=["--variant", variant])
        assert res.returncode == 0, res.stderr[-3000:]
        m = json.loads((Path(p["paths"]["metrics_dir"]) / f"train_{variant}.json").read_text())
        assert m["mode"] == "extend" and m["steps"] == 2
        counts[variant] = m["trainable_params"]
    assert counts["lora_baseline"] == pytest.approx(counts["flexigpt"], rel=0.05)  # the fair, matched baseline


@pytest.mark.parametrize("over,param", [({"start": 9}, "extend.start"), ({"start": 3, "end": 2}, "extend.start"),
                                        ({"repeats": 0}, "extend.repeats"), ({"target_depth": 20}, "extend.target_depth")])
def test_svd_init_refuses_bad_extend_params(tiny_project, over, param):
    tmp, p = tiny_project
    q = copy.deepcopy(p)
    q["extend"].update(over)
    q["paths"]["flexigpt_init"] = str(tmp / "bad_init")
    assert_clean_error(run_stage("svd_init", q, tmp), param)
    assert not (tmp / "bad_init").exists()


def test_unknown_mode_is_refused_before_training(tiny_project):
    tmp, p = tiny_project
    q = copy.deepcopy(p)
    q["mode"] = "grow"
    assert_clean_error(run_stage("train_adapters", q, tmp, args=["--variant", "lora_baseline"]), "mode")


def test_paper_extension_preset_reaches_36_layers():
    import yaml

    from flexigpt.variants import extension_spec

    root = Path(__file__).resolve().parents[1]
    preset = yaml.safe_load((root / "configs/presets/paper_tinyllama_extend.yaml").read_text())
    p = Params.load(root / "params.yaml")
    p = p.with_overrides({f"{g}.{k}": v for g, sec in preset.items() if isinstance(sec, dict) for k, v in sec.items()})
    spec = extension_spec(p, 22)  # TinyLlama-1.1B has 22 blocks
    assert len(spec.sources) == 36 and len(spec.replaced) == 14


def test_training_refuses_bad_extend_params_before_loading(tiny_project):
    tmp, p = tiny_project
    q = copy.deepcopy(p)
    q["extend"]["repeats"] = 0
    assert_clean_error(run_stage("train_adapters", q, tmp, args=["--variant", "lora_baseline"]), "extend.repeats")
