"""The real embedded model (SmolLM2-135M) through every stage, at tiny budgets.

The pipeline run is the ``dvc_project`` fixture's `make repro` (shared with tests/test_dvc_pipeline.py);
these tests check what it produced, then run single stages directly for bad inputs and extend mode.
"""
import copy
import json
from pathlib import Path

import pytest

from helpers import assert_clean_error, project_params, run_stage

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def params(dvc_project):
    return project_params(dvc_project[0])


def test_import_and_splits(params):
    m = json.loads(Path(params["paths"]["import_metrics"]).read_text())
    assert m["num_blocks"] == 30 and m["hidden_size"] == 576
    man = json.loads((Path(params["paths"]["data"]) / "manifest.json").read_text())
    assert man["splits"]["calibration"]["sequences"] == 8


def test_plan_and_start_ppl(params):
    plan = json.loads((Path(params["paths"]["plan"]) / "plan.json").read_text())
    assert len(plan["pruned"]) == 9 and not set(map(int, plan["base"].values())) & set(plan["pruned"])
    m = json.loads(Path(params["paths"]["svd_init_metrics"]).read_text())
    assert m["dense"]["heldout_ppl"] < m["shortgpt"]["heldout_ppl"]
    assert m["flexigpt"]["heldout_ppl"] < 1.5 * m["shortgpt"]["heldout_ppl"]  # small γ: starts near ShortGPT
    assert m["disk"]["compact_bytes"] < m["disk"]["dense_bytes"]


def test_train_evaluate_compare(params):
    for variant in ("flexigpt", "lora_baseline"):
        m = json.loads((Path(params["paths"]["metrics_dir"]) / f"train_{variant}.json").read_text())
        assert m["steps"] == 2 and m["tokens_seen"] == 1024 and m["seed"] == 0
        assert not (Path(params["paths"]["checkpoints"]) / variant).exists()  # removed once finished
    for variant in params["evaluate"]["variants"]:
        m = json.loads((Path(params["paths"]["metrics_dir"]) / "eval" / f"{variant}.json").read_text())
        assert set(m["tasks"]) == {"arc_easy", "piqa"} and m["wikitext2_ppl_256"] > 1
    table = (Path(params["paths"]["reports"]) / "comparison.md").read_text()
    for v in ("dense", "shortgpt", "lora_baseline", "flexigpt"):
        assert f"| {v} |" in table
    assert (Path(params["paths"]["plots_dir"]) / "comparison.png").stat().st_size > 1000


def test_bad_eval_inputs(params, tmp_path):
    q = copy.deepcopy(params)
    q["evaluate"]["tasks"] = ["arc_easy", "mmlu"]
    assert_clean_error(run_stage("evaluate", q, tmp_path, args=["--variant", "dense"]), "evaluate.tasks")
    q = copy.deepcopy(params)
    q["evaluate"]["limit"] = 0
    assert_clean_error(run_stage("evaluate", q, tmp_path, args=["--variant", "dense"]), "evaluate.limit")
    q = copy.deepcopy(params)
    assert_clean_error(run_stage("evaluate", q, tmp_path, args=["--variant", "nope"]), "variant")
    q["data"]["dir"] = str(tmp_path / "nodata")
    (tmp_path / "nodata").mkdir()
    res = run_stage("evaluate", q, tmp_path, args=["--variant", "dense"])
    assert_clean_error(res, "data.dir")
    assert "arc_easy/test.jsonl" in res.stderr


def test_extend_mode_on_the_real_model(params, tmp_path):
    """mode: extend: 30 -> 36 blocks that start as the base model, then continued pretraining.

    The rest of the extend pipeline (baseline, evaluation, table) is covered on tiny models in
    tests/test_extend_pipeline.py.
    """
    q = copy.deepcopy(params)
    q["mode"] = "extend"
    for k in ("flexigpt_init", "svd_init_metrics", "trained", "checkpoints", "metrics_dir", "plots_dir", "timing"):
        q["paths"][k] = str(tmp_path / "extend" / Path(params["paths"][k]).name)
    res = run_stage("svd_init", q, tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads(Path(q["paths"]["svd_init_metrics"]).read_text())
    assert (m["depth_before"], m["depth_after"]) == (30, 36)
    assert abs(m["start_ppl_vs_dense"] - 1) < 0.01  # γ = 1e-3 and zero adapters: starts as the base model
    res = run_stage("train_adapters", q, tmp_path, timeout=900, args=["--variant", "flexigpt"])
    assert res.returncode == 0, res.stderr[-4000:]
    t = json.loads((Path(q["paths"]["metrics_dir"]) / "train_flexigpt.json").read_text())
    assert t["mode"] == "extend" and t["steps"] == 2
