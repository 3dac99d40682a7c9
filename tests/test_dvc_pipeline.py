"""The project's own dvc.yaml, run the way a user runs it: `make repro` from a shell without the venv.

The ``dvc_project`` fixture (conftest) copies the tracked files into a fresh git repository beside a
``shared`` folder (a link to the offline data), with tiny budgets in params.yaml, and runs
``make repro`` once. Then:

1. that run ran every stage, and the table lists the four variants;
2. a second ``make repro`` runs nothing;
3. ``dvc exp run --temp -S evaluate.limit=3`` (venv activated; a temp copy, with the default
   relative ``data.dir``) reruns exactly the evaluate stages and compare; a second one that also sets
   ``baseline.params_matched`` restores FlexiGPT's stages and the other evaluations from the run-cache;
4. ``dvc repro -f`` reruns everything and every output in dvc.lock keeps its md5: training included,
   bit for bit. Only the run records (``metrics/timing/*``, wall-clock by design) may differ.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from helpers import PIPELINE_STAGES, VENV_BIN, run_in

pytestmark = pytest.mark.e2e
EVALUATE_AND_COMPARE = {"evaluate@dense", "evaluate@shortgpt", "evaluate@lora_baseline", "evaluate@flexigpt",
                        "compare"}


def locked_outs(project) -> dict[str, str]:
    """path -> md5 of every output in dvc.lock, except the run records (wall-clock by design)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    timing = yaml.safe_load((project / "params.yaml").read_text())["paths"]["timing"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])
            if not o["path"].startswith(timing)}


def test_make_repro_from_a_clean_shell(dvc_project):
    project, ran, seconds = dvc_project
    print(f"make repro (every stage, tiny budgets): {seconds:.0f} s")
    assert ran == PIPELINE_STAGES, sorted(ran)
    table = (project / "reports" / "comparison.md").read_text()
    for v in ("dense", "shortgpt", "lora_baseline", "flexigpt"):
        assert f"| {v} |" in table
    record = json.loads((project / "metrics" / "timing" / "train_flexigpt.json").read_text())
    assert record["train_s"] > 0 and record["runtime"]["threads"] >= 1  # wall-clock lives in the run record
    metrics = json.loads((project / "metrics" / "eval" / "flexigpt.json").read_text())
    assert metrics["runtime"]["dtype"] in ("float32", "bfloat16") and "latency_s" not in metrics["cost"]
    assert (project / ".dvc/tmp/exps/standalone/shared").is_symlink()  # made by make repro, for --temp runs

    ran, _ = run_in(project, ["make", "repro", f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed"], with_venv=False)
    assert ran == set(), f"a second make repro reran {sorted(ran)}"


def test_temp_experiment_reruns_exactly_what_the_param_touches(dvc_project):
    project, _, _ = dvc_project
    t0 = time.time()
    ran, out = run_in(project, [str(VENV_BIN / "dvc"), "exp", "run", "--temp", "-n", "limit3",
                                "-S", "evaluate.limit=3"], with_venv=True)
    print(f"dvc exp run --temp -S evaluate.limit=3: {time.time() - t0:.0f} s")
    assert ran == EVALUATE_AND_COMPARE, (sorted(ran), out[-3000:])
    ref = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                         capture_output=True, text=True, check=True).stdout.split()
    ref = next(r for r in ref if r.endswith("/limit3"))
    dense = json.loads(subprocess.run(["git", "show", f"{ref}:metrics/eval/dense.json"], cwd=project,
                                      capture_output=True, text=True, check=True).stdout)
    assert dense["n_docs"]["arc_easy"] == 3
    workspace = json.loads((project / "metrics" / "eval" / "dense.json").read_text())
    assert workspace["n_docs"]["arc_easy"] == 2  # a temp run leaves the workspace alone
    import mlflow  # the experiment is an MLflow parent run in the project's store, not in the deleted temp copy

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`flexigpt.kind` = 'pipeline'")
    assert "limit3" in {r.info.run_name for r in runs}, sorted(r.info.run_name for r in runs)

    # A second experiment that changes only the baseline's rank restores FlexiGPT's training and the other
    # evaluations from DVC's run-cache (a study's arms share them), and reruns only what the param touches.
    ran, out = run_in(project, [str(VENV_BIN / "dvc"), "exp", "run", "--temp", "-n", "limit3-matched",
                                "-S", "evaluate.limit=3", "-S", "baseline.params_matched=true"], with_venv=True)
    assert ran == {"train_lora_baseline", "evaluate@lora_baseline", "compare"}, (sorted(ran), out[-3000:])
    assert "Stage 'evaluate@flexigpt' is cached - skipping run" in out, out[-3000:]


def test_forced_rerun_gives_the_same_bytes(dvc_project):
    project, _, _ = dvc_project
    before = locked_outs(project)
    t0 = time.time()
    ran, _ = run_in(project, [str(VENV_BIN / "dvc"), "repro", "-f"], with_venv=True)
    print(f"dvc repro -f: {time.time() - t0:.0f} s")
    assert ran == PIPELINE_STAGES
    after = locked_outs(project)
    assert set(before) == set(after) and len(before) > 20
    changed = sorted(p for p in before if before[p] != after[p])
    print(f"{len(before)} outputs compared; changed: {changed}")
    assert not changed, f"outputs whose bytes changed on a forced rerun: {changed}"
