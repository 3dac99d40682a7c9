"""Multi-seed studies: per-sample files, paired bootstrap verdicts, grouping experiments, study files."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from flexigpt.errors import FlexiError
from flexigpt.report import experiments, study
from flexigpt.report.study import BETTER, UNRESOLVED, WORSE, Samples, samples_from_dict
from helpers import ROOT

SETTINGS = {"tasks": list(study.PAPER_TASKS), "limit": 40, "ppl_windows": [2048, 512], "ppl_max_windows": 4,
            "heldout_sequences": 16, "dtype": "float32"}


def make(variant: str, correct: dict[str, np.ndarray], nll: dict[str, np.ndarray] | None = None,
         settings: dict | None = None, source: str = "workspace") -> Samples:
    """A Samples from 0/1 arrays per task (acc_norm too, except winogrande, as lm-eval reports)."""
    tasks = {}
    for t, c in correct.items():
        tasks[t] = {"doc_ids": list(range(len(c))), "acc": [int(x) for x in c]}
        if t != "winogrande":
            tasks[t]["acc_norm"] = [int(x) for x in c]
    nll = nll or {"heldout": np.full(16, 3.0), "wikitext2_2048": np.full(4, 3.2)}
    data = {"variant": variant, "settings": settings or SETTINGS, "tasks": tasks,
            "nll": {k: [float(x) for x in v] for k, v in nll.items()}}
    return samples_from_dict(data, source=source, variant=variant)


def random_pair(rng, n: int, p_a: float, p_b: float, variant_a="flexigpt", variant_b="lora_baseline"):
    """Two variants on the same n docs per task, with accuracies p_a and p_b."""
    a = {t: (rng.random(n) < p_a).astype(int) for t in study.PAPER_TASKS}
    b = {t: (rng.random(n) < p_b).astype(int) for t in study.PAPER_TASKS}
    return make(variant_a, a), make(variant_b, b)


def test_paper_tasks_match_the_evaluate_library():
    from flexigpt.evaluate.lm_tasks import PAPER_TASKS

    assert study.PAPER_TASKS == PAPER_TASKS


def test_bootstrap_is_deterministic():
    rng = np.random.default_rng(1)
    pairs = [random_pair(rng, 60, 0.5, 0.45) for _ in range(3)]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    c1 = study.compare(a, b, n_boot=2000, seed=7)
    c2 = study.compare(a, b, n_boot=2000, seed=7)
    assert c1 == c2
    assert study.compare(a, b, n_boot=2000, seed=8).average.lo != c1.average.lo  # the seed is what fixes it


def test_truly_better_by_10_points_on_500_docs_is_better():
    rng = np.random.default_rng(0)
    pairs = [random_pair(rng, 500, 0.60, 0.50) for _ in range(2)]
    c = study.compare([p[0] for p in pairs], [p[1] for p in pairs], n_boot=2000)
    assert c.average.verdict == BETTER and c.average.lo > 0
    assert 6 < c.average.value < 14 and c.average.lo < c.average.value < c.average.hi
    reverse = study.compare([p[1] for p in pairs], [p[0] for p in pairs], n_boot=2000)
    assert reverse.average.verdict == WORSE


def test_identical_variants_are_not_resolved():
    rng = np.random.default_rng(2)
    a, _ = random_pair(rng, 100, 0.5, 0.5)
    b = make("lora_baseline", {t: a.tasks[t].metrics["acc"] for t in study.PAPER_TASKS})
    c = study.compare([a], [b], n_boot=500)
    assert c.average.lo <= 0 <= c.average.hi and c.average.verdict == UNRESOLVED
    assert all(e.verdict == UNRESOLVED for e in c.tasks.values())
    assert c.ppl_ratio["heldout"].value == 1.0 and c.ppl_ratio["heldout"].verdict == UNRESOLVED
    assert c.docs_needed == 0 and c.half_width == 0


def test_lower_nll_is_better_ppl():
    rng = np.random.default_rng(3)
    acc = {t: (rng.random(40) < 0.5).astype(int) for t in study.PAPER_TASKS}
    a = make("flexigpt", acc, {"heldout": 3.0 + 0.05 * rng.standard_normal(16)})
    b = make("lora_baseline", acc, {"heldout": 3.2 + 0.05 * rng.standard_normal(16)})
    c = study.compare([a], [b], n_boot=1000)
    r = c.ppl_ratio["heldout"]
    assert r.verdict == BETTER and r.hi < 1
    assert r.value == pytest.approx(a.ppl("heldout") / b.ppl("heldout"))


def test_docs_needed_matches_a_hand_computation():
    # task t: A and B differ on q_t of the docs; mean difference δ_t
    q = {"arc_easy": 0.2, "arc_challenge": 0.3, "piqa": 0.1, "winogrande": 0.4, "hellaswag": 0.25}
    d = {"arc_easy": 0.1, "arc_challenge": 0.0, "piqa": -0.05, "winogrande": 0.2, "hellaswag": 0.05}
    var = (0.2 - 0.01) + 0.3 + (0.1 - 0.0025) + (0.4 - 0.04) + (0.25 - 0.0025)  # = 1.195
    # 1.96 * sqrt(var / n) / 5 * 100 <= 1  <=>  n >= (1.96 * 100 / 5)^2 * var = 1536.64 * 1.195 = 1836.3
    assert study.docs_needed(q, d) == 1837
    assert study.half_width(q, d, dict.fromkeys(q, 40)) == pytest.approx(1.959964 * (var / 40) ** 0.5 / 5 * 100,
                                                                          rel=1e-6)
    # and from data: one task pattern repeated, so q and δ are exact
    a = make("flexigpt", {t: np.array([1, 1, 0, 0] * 10) for t in study.PAPER_TASKS})
    b = make("lora_baseline", {t: np.array([1, 0, 1, 1] * 10) for t in study.PAPER_TASKS})
    c = study.compare([a], [b], n_boot=200)
    assert c.disagreement["piqa"] == 0.75  # differ on 3 of 4; δ = (0 + 1 - 1 - 1) / 4 = -0.25
    assert c.docs_needed == int(np.ceil((study.Z95 * 100 / 5) ** 2 * 5 * (0.75 - 0.0625)))


def test_refuses_pairs_with_different_settings_or_docs():
    rng = np.random.default_rng(4)
    a, b = random_pair(rng, 40, 0.5, 0.5)
    other = make("lora_baseline", {t: b.tasks[t].metrics["acc"] for t in study.PAPER_TASKS},
                 settings={**SETTINGS, "limit": 100})
    with pytest.raises(FlexiError) as e:
        study.compare([a], [other])
    assert e.value.param == "settings.limit" and "40" in e.value.problem and "100" in e.value.problem
    shifted = make("lora_baseline", {t: b.tasks[t].metrics["acc"] for t in study.PAPER_TASKS})
    shifted.tasks["piqa"].doc_ids[:] += 1000
    with pytest.raises(FlexiError, match="tasks.piqa.doc_ids"):
        study.compare([a], [shifted])


def test_invalid_or_missing_samples_file(tmp_path):
    with pytest.raises(FlexiError) as e:
        study.load_samples(tmp_path / "flexigpt.json", experiment="seeds-seed1")
    assert "seeds-seed1" in str(e.value) and "evaluate@flexigpt" in e.value.fix
    bad = tmp_path / "shortgpt.json"
    bad.write_text(json.dumps({"variant": "shortgpt", "settings": {}, "tasks": {"piqa": {"doc_ids": [0, 1],
                                                                                           "acc": [1, 2]}}, "nll": {}}))
    with pytest.raises(FlexiError, match="other than 0/1") as e:
        study.load_samples(bad)
    assert "evaluate@shortgpt" in e.value.fix


def test_missing_samples_in_an_experiment_names_it_and_the_stage(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    ok = make("dense", {t: np.ones(4, int) for t in study.PAPER_TASKS})
    rel = tmp_path / "metrics" / "eval" / "samples"
    rel.mkdir(parents=True)
    (rel / "dense.json").write_text(json.dumps({"variant": "dense", "settings": ok.settings,
                                                "tasks": {t: {"doc_ids": [0, 1, 2, 3], "acc": [1, 1, 1, 1]}
                                                          for t in study.PAPER_TASKS},
                                                "nll": {"heldout": [3.0]}}))
    (rel / "shortgpt.json").write_text(json.dumps({"variant": "shortgpt", "mode": "extend", "applicable": False}))
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    params = {"evaluate.variants.dense": "artifacts/base_model", "evaluate.variants.flexigpt": "artifacts/x"}
    exp = {"name": "seeds-seed2", "rev": rev, "params": {"evaluate.variants.dense": "artifacts/base_model",
                                                         "evaluate.variants.shortgpt": "artifacts/plan"}}
    got = experiments.read_samples(tmp_path, exp)  # read with git show; a not-applicable variant is left out
    assert list(got) == ["dense"] and got["dense"].accuracy("piqa") == 1.0
    with pytest.raises(FlexiError) as e:
        experiments.read_samples(tmp_path, {**exp, "params": params})
    assert e.value.param == "experiment seeds-seed2" and "flexigpt.json is missing" in e.value.problem
    assert "evaluate@flexigpt" in e.value.fix and "dvc exp" in e.value.fix


def test_samples_of_an_experiment_come_from_the_dvc_cache_through_its_lock(tmp_path, monkeypatch):
    """The samples file is a cached output: its experiment commit has only dvc.lock's md5 for it."""
    import hashlib

    monkeypatch.setattr(experiments, "_dvc_cache_dir", lambda root: root / ".dvc" / "cache")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    text = json.dumps({"variant": "dense", "settings": SETTINGS,
                       "tasks": {t: {"doc_ids": [0, 1, 2], "acc": [1, 0, 1]} for t in study.PAPER_TASKS},
                       "nll": {"heldout": [3.0]}})
    md5 = hashlib.md5(text.encode()).hexdigest()
    obj = tmp_path / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True)
    obj.write_text(text)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"evaluate@dense": {
        "cmd": "python stages/evaluate.py --variant dense",
        "outs": [{"path": "metrics/eval/samples/dense.json", "hash": "md5", "md5": md5, "size": len(text)}]}}}))
    subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    exp = {"name": "seeds-seed1", "rev": rev, "params": {"evaluate.variants.dense": "artifacts/base_model"}}
    got = experiments.read_samples(tmp_path, exp)
    assert abs(got["dense"].accuracy("piqa") - 2 / 3) < 1e-12
    obj.unlink()  # e.g. the experiment was made on another machine and only its git refs were pulled
    with pytest.raises(FlexiError) as e:
        experiments.read_samples(tmp_path, exp)
    assert e.value.param == "experiment seeds-seed1" and md5 in e.value.problem
    assert "dvc exp pull" in e.value.fix and "seeds-seed1" in e.value.fix


def exp(name: str, seed: int, rng, **params) -> dict:
    a, b = random_pair(rng, 40, 0.5, 0.5)
    p = {"train.seed": seed, "prune.rank": 32, "evaluate.limit": 40, "train.token_budget": 24576, **params}
    return {"name": name, "rev": name, "params": p, "samples": {"flexigpt": a, "lora_baseline": b}}


def test_collect_groups_by_params_without_the_seed():
    rng = np.random.default_rng(5)
    exps = [exp(f"b{s}-{m}", s, rng, **{"train.token_budget": 24576 * m}) for s in (2, 0, 1) for m in (1, 4)]
    groups = study.collect(exps)
    assert len(groups) == 2 and all(g.seeds == [0, 1, 2] for g in groups)
    assert {g.label for g in groups} == {"train.token_budget=24576", "train.token_budget=98304"}
    assert groups[0].experiments == ["b0-1", "b1-1", "b2-1"]
    table = study.study_table(groups, n_boot=200)
    assert "3 seed(s) [0, 1, 2]" in table and "docs/task for ±1 pt" in table and "ShortGPT+LoRA" in table
    assert UNRESOLVED in table


def test_collect_refuses_experiments_with_a_different_plan_param():
    rng = np.random.default_rng(6)
    with pytest.raises(FlexiError) as e:
        study.collect([exp("a", 0, rng), exp("b", 1, rng, **{"prune.rank": 64})])
    assert e.value.param == "prune.rank" and "32" in e.value.problem and "64" in e.value.problem


def test_collect_refuses_two_experiments_of_the_same_seed_but_drops_a_duplicate_workspace():
    rng = np.random.default_rng(7)
    with pytest.raises(FlexiError, match="same params and seed"):
        study.collect([exp("a", 0, rng), exp("b", 0, rng)])
    g, = study.collect([exp("workspace", 0, rng), exp("a", 0, rng), exp("b", 1, rng)])
    assert g.experiments == ["a", "b"] and "workspace skipped" in g.notes[0]


def test_baseline_arms_share_one_table_when_the_other_variants_are_identical():
    """`baseline.params_matched` touches only ShortGPT+LoRA: its two arms are one comparison, FlexiGPT once."""
    rng = np.random.default_rng(8)
    exps = []
    for s in (0, 1):
        flexi, b32 = random_pair(rng, 40, 0.5, 0.5)
        b46 = random_pair(rng, 40, 0.5, 0.5)[1]
        for matched, base in ((False, b32), (True, b46)):
            p = {"train.seed": s, "prune.rank": 32, "evaluate.limit": 40, "baseline.params_matched": matched}
            exps.append({"name": f"s{s}-{matched}", "rev": "r", "params": p,
                         "samples": {"flexigpt": flexi, "lora_baseline": base}})
    g, = study.collect(exps)
    assert list(g.samples) == ["flexigpt", "lora_baseline[baseline.params_matched=False]",
                               "lora_baseline[baseline.params_matched=True]"]
    assert g.seeds == [0, 1] and len(g.experiments) == 4 and "baseline.params_matched" not in g.params
    table = study.study_table([g], n_boot=200)
    assert "| ShortGPT+LoRA [params_matched=True] |" in table and table.count("| FlexiGPT |") == 1
    # FlexiGPT's results differ between the arms (e.g. another machine): two groups, each saying why
    exps[1]["samples"] = {**exps[1]["samples"], "flexigpt": random_pair(rng, 40, 0.5, 0.5)[0]}
    groups = study.collect(exps)
    assert len(groups) == 2 and all("flexigpt differs" in g.notes[0] for g in groups)
    assert {g.label for g in groups} == {"baseline.params_matched=False", "baseline.params_matched=True"}


def test_the_seed_is_the_training_seed():
    assert study.seed_of({"data.seed": 0, "train.seed": 3}) == 3 and study.seed_of({"data.seed": 2}) is None


CANNED_EXP_SHOW = [  # `dvc exp show --json --no-fetch` (DVC 3.67): workspace, baseline with a done + a queued exp
    {"rev": "workspace", "name": None, "error": None, "experiments": None,
     "data": {"rev": "workspace", "params": {"params.yaml": {"data": {"seed": 1, "train": {"lr": 0.1}}}}}},
    {"rev": "24c01c98", "name": "master", "error": None,
     "data": {"rev": "24c01c98", "params": {"params.yaml": {"data": {"seed": 0, "train": {"lr": 0.1}}}}},
     "experiments": [
         {"revs": [{"rev": "86fa5204", "name": "s1", "error": None, "experiments": None,
                    "data": {"rev": "86fa5204", "params": {"params.yaml": {"data": {"seed": 1, "train": {"lr": 0.1}}}}}}],
          "executor": None, "name": "s1"},
         {"revs": [{"rev": "51aee2b9", "name": "s2", "error": None, "experiments": None,
                    "data": {"rev": "51aee2b9", "params": {"params.yaml": {"data": {"seed": 2, "train": {"lr": 0.1}}}}}}],
          "executor": {"state": "queued", "name": "dvc-task"}, "name": "s2"}]}]


def test_parse_exp_show():
    rows = experiments.parse_exp_show(json.loads(json.dumps(CANNED_EXP_SHOW)))
    assert [(r["name"], r["rev"], r["state"]) for r in rows] == [("workspace", "workspace", None),
                                                                   ("s1", "86fa5204", None), ("s2", "51aee2b9", "queued")]
    assert rows[1]["params"] == {"seed": 1, "train.lr": 0.1}


def test_replace_block_between_markers():
    doc = study.replace_block("# Results\n", "table 1")
    assert doc == f"# Results\n\n{study.BEGIN}\ntable 1\n{study.END}\n"
    assert study.replace_block(doc + "after\n", "table 2") == f"# Results\n\n{study.BEGIN}\ntable 2\n{study.END}\nafter\n"


# -- study files ---------------------------------------------------------------------------------

def project(tmp_path, study_spec: dict) -> tuple:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"seed": 0, "train": {"token_budget": 100, "lr": 0.1}, "paths": {"timing": "t", "reports": "r"},
         "prune": {"rank": 32}}))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "train": {"cmd": "x", "params": ["seed", "train", "paths.reports"]},
        "ev": {"foreach": ["a"], "do": {"cmd": "y", "params": [{"params.yaml": ["prune.rank"]}]}}}}))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(study_spec))
    return f, tmp_path


def test_study_file_expands_the_sweep(tmp_path):
    st = experiments.load_study(*project(tmp_path, {"description": "d", "sweep": {"seed": [0, 1],
                                                                                "train.token_budget": [100, 400]},
                                                  "set": {"prune.rank": 16}}))
    cmds = [experiments.format_command(c) for c in experiments.study_commands(st)]
    assert cmds[0] == "dvc exp run --queue -S prune.rank=16 -S seed=0 -S train.token_budget=100 -n s-seed0-token_budget100"
    assert len(cmds) == 4 and cmds[-1].endswith("-S seed=1 -S train.token_budget=400 -n s-seed1-token_budget400")


def test_study_file_refuses_an_unknown_param(tmp_path):
    with pytest.raises(FlexiError) as e:
        experiments.load_study(*project(tmp_path, {"description": "d", "sweep": {"train.seeed": [0, 1]}}))
    assert e.value.param == "train.seeed" and "not a key of params.yaml" in e.value.problem


def test_study_file_refuses_a_param_no_stage_declares(tmp_path):
    with pytest.raises(FlexiError) as e:
        experiments.load_study(*project(tmp_path, {"description": "d", "sweep": {"seed": [0]},
                                                   "set": {"paths.timing": "u"}}))
    assert e.value.param == "paths.timing" and "no stage" in e.value.problem


def test_shipped_study_files_dry_run():
    out = subprocess.run([sys.executable, "-m", "flexigpt.pipeline.cli", "study", "budget", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cmds = [line for line in out.stdout.splitlines() if line.startswith("dvc exp run --queue")]
    assert len(cmds) == 6 and "-S train.seed=2 -S train.token_budget=65536 -n budget-seed2-token_budget65536" in cmds[-1]
    assert "nothing queued" in out.stdout
    for f in sorted((ROOT / "configs" / "studies").glob("*.yaml")):
        assert experiments.study_commands(experiments.load_study(f, ROOT)), f
