"""One small end-to-end run of every stage on the real embedded model (SmolLM2-135M), tiny budgets."""
import json
from pathlib import Path

import pytest

from conftest import DATA_DIR
from helpers import base_params, run_stage

pytestmark = pytest.mark.e2e

STAGES = ["import_model", "prepare_calibration", "score_importance", "prune", "svd_init"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if not (DATA_DIR / "calibration" / "calib_text.jsonl").is_file():
        pytest.fail(f"offline data not found at {DATA_DIR}; set FLEXIGPT_DATA_DIR")
    tmp = tmp_path_factory.mktemp("e2e")
    p = base_params(tmp)
    p["data"]["dir"] = str(DATA_DIR)
    p["calibration"].update(seq_len=128, n_sequences=8, train_tokens=128 * 16)
    p["heldout"]["n_sequences"] = 4
    p["importance"].update(batch_size=4, dtype="float32")
    p["train"].update(batch_size=4, micro_batch=2, token_budget=128 * 4 * 2, checkpoint_every=1, dtype="auto")
    p["evaluate"].update(limit=2, ppl_windows=[256], ppl_max_windows=1, wikitext_docs=1, batch_size=4,
                         tasks=["arc_easy", "piqa", "winogrande"])
    p["evaluate"]["variants"] = {k: str(tmp / v) for k, v in p["evaluate"]["variants"].items()}
    results = {}
    for st in STAGES:
        results[st] = run_stage(st, p, tmp, timeout=900)
        assert results[st].returncode == 0, (st, results[st].stderr[-4000:])
    return tmp, p, results


def test_import_and_splits(pipeline):
    tmp, p, _ = pipeline
    m = json.loads(Path(p["paths"]["import_metrics"]).read_text())
    assert m["num_blocks"] == 30 and m["hidden_size"] == 576
    man = json.loads((Path(p["paths"]["data"]) / "manifest.json").read_text())
    assert man["splits"]["calibration"]["sequences"] == 8


def test_plan_and_start_ppl(pipeline):
    tmp, p, _ = pipeline
    plan = json.loads((Path(p["paths"]["plan"]) / "plan.json").read_text())
    assert len(plan["pruned"]) == 9 and not set(map(int, plan["base"].values())) & set(plan["pruned"])
    m = json.loads(Path(p["paths"]["svd_init_metrics"]).read_text())
    assert m["dense"]["heldout_ppl"] < m["shortgpt"]["heldout_ppl"]
    assert m["flexigpt"]["heldout_ppl"] < 1.5 * m["shortgpt"]["heldout_ppl"]  # small γ: starts near ShortGPT
    assert m["disk"]["compact_bytes"] < m["disk"]["dense_bytes"]


def test_train_evaluate_compare(pipeline):
    tmp, p, _ = pipeline
    for variant in ("flexigpt", "lora_baseline"):
        res = run_stage("train_adapters", p, tmp, timeout=900, args=["--variant", variant])
        assert res.returncode == 0, res.stderr[-4000:]
        m = json.loads((Path(p["paths"]["metrics_dir"]) / f"train_{variant}.json").read_text())
        assert m["steps"] == 2 and m["tokens_seen"] == 1024
        assert not (Path(p["paths"]["checkpoints"]) / variant).exists()  # removed once finished
    for variant in p["evaluate"]["variants"]:
        res = run_stage("evaluate", p, tmp, timeout=900, args=["--variant", variant])
        assert res.returncode == 0, (variant, res.stderr[-4000:])
        m = json.loads((Path(p["paths"]["metrics_dir"]) / "eval" / f"{variant}.json").read_text())
        assert set(m["tasks"]) == {"arc_easy", "piqa", "winogrande"} and m["wikitext2_ppl_256"] > 1
    res = run_stage("compare", p, tmp, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    table = (Path(p["paths"]["reports"]) / "comparison.md").read_text()
    for v in ("dense", "shortgpt", "lora_baseline", "flexigpt"):
        assert f"| {v} |" in table
    assert (Path(p["paths"]["plots_dir"]) / "comparison.png").stat().st_size > 1000


def test_bad_eval_inputs(pipeline):
    tmp, p, _ = pipeline
    import copy

    from helpers import assert_clean_error

    q = copy.deepcopy(p)
    q["evaluate"]["tasks"] = ["arc_easy", "mmlu"]
    assert_clean_error(run_stage("evaluate", q, tmp, args=["--variant", "dense"]), "evaluate.tasks")
    q = copy.deepcopy(p)
    q["evaluate"]["limit"] = 0
    assert_clean_error(run_stage("evaluate", q, tmp, args=["--variant", "dense"]), "evaluate.limit")
    q = copy.deepcopy(p)
    assert_clean_error(run_stage("evaluate", q, tmp, args=["--variant", "nope"]), "variant")
    q["data"]["dir"] = str(tmp / "nodata")
    (tmp / "nodata").mkdir()
    res = run_stage("evaluate", q, tmp, args=["--variant", "dense"])
    assert_clean_error(res, "data.dir")
    assert "arc_easy/test.jsonl" in res.stderr


def test_extend_mode_end_to_end(pipeline):
    """mode: extend on the real model: 30 -> 36 blocks, starts as the base, trains, evaluates, compares."""
    import copy

    tmp, p, _ = pipeline
    q = copy.deepcopy(p)
    q["mode"] = "extend"
    ext = tmp / "extend"
    for k in ("flexigpt_init", "svd_init_metrics", "trained", "checkpoints", "metrics_dir", "plots_dir", "eval",
              "reports"):
        q["paths"][k] = str(ext / Path(p["paths"][k]).name)
    q["evaluate"]["variants"] = {"dense": p["paths"]["base_model"], "shortgpt": p["paths"]["plan"],
                                 "lora_baseline": str(ext / "trained/lora_baseline"),
                                 "flexigpt": str(ext / "trained/flexigpt")}
    res = run_stage("svd_init", q, tmp, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads(Path(q["paths"]["svd_init_metrics"]).read_text())
    assert (m["depth_before"], m["depth_after"]) == (30, 36)
    assert abs(m["start_ppl_vs_dense"] - 1) < 0.01  # γ = 1e-3 and zero adapters: starts as the base model
    for variant in ("flexigpt", "lora_baseline"):
        res = run_stage("train_adapters", q, tmp, timeout=900, args=["--variant", variant])
        assert res.returncode == 0, (variant, res.stderr[-4000:])
    for variant in q["evaluate"]["variants"]:
        res = run_stage("evaluate", q, tmp, timeout=900, args=["--variant", variant])
        assert res.returncode == 0, (variant, res.stderr[-4000:])
    assert json.loads((ext / "metrics/eval/shortgpt.json").read_text())["applicable"] is False
    assert json.loads((ext / "metrics/eval/flexigpt.json").read_text())["cost"]["block_executions"] == 36
    res = run_stage("compare", q, tmp, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    table = (ext / "reports/comparison.md").read_text()
    assert "FlexiGPT extended" in table and "base+LoRA (matched params)" in table and "| shortgpt |" not in table
