"""Same code, params and data give the same bytes; and what the bytes depend on is a setting, not luck."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from flexigpt.model import checkpoint as compact
from flexigpt.evaluate import lm_tasks
from flexigpt.config import Params, data_dir
from flexigpt.devices import resolve_threads, runtime_info
from flexigpt.errors import FlexiError
from flexigpt.compress.plan import make_plan
from flexigpt.pipeline.stagekit import link_exp_data
from flexigpt.train import TrainSettings, train
from flexigpt.variants import build_variant

PARAMS = {"train": {"seed": 0}, "mode": "prune",
          "adapters": {"rank": 4, "alpha": None, "targets": ["all"], "init": "svd_diff", "lora_on_kept": True},
          "norm": {"enabled": True, "gamma_init": 0.001}}


def tiny_plan(base):
    return make_plan(base, [0.5, 0.1, 0.4, 0.2, 0.9, 0.8], ratio=None, blocks=[1, 3], rank=4)


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def test_build_is_seeded():
    """The old nondeterminism: PEFT draws the kept blocks' LoRA A from the global RNG, unseeded."""
    base = make_tiny_llama()
    plan = tiny_plan(base)
    p = Params(PARAMS)
    a = build_variant(base, "flexigpt", p, plan)
    torch.rand(100)  # whatever ran before the build must not matter
    b = build_variant(base, "flexigpt", p, plan)
    lora_a = [n for n, _ in a.named_parameters() if "lora_A" in n]
    assert lora_a
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(sa[n], sb[n]) for n in lora_a)
    c = build_variant(base, "flexigpt", p.with_overrides({"train.seed": 1}), plan)
    sc = dict(c.named_parameters())
    assert any(not torch.equal(sa[n], sc[n]) for n in lora_a)  # the seed is what decides


def test_training_twice_gives_the_same_bytes(tmp_path, tokens):
    """Build, train and save twice; the compact checkpoints are equal byte for byte."""
    base = make_tiny_llama()
    plan = tiny_plan(base)
    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(3))
    s = TrainSettings(lr=1e-2, batch_size=4, micro_batch=2, token_budget=4 * 16 * 3, warmup_steps=1,
                      checkpoint_every=0, dtype="float32")
    out = []
    for run in range(2):
        torch.manual_seed(1000 + run)  # a different global RNG state before each run
        model = build_variant(base, "flexigpt", Params(PARAMS), plan)
        res = train(model, ids, s, resume=False)
        compact.save(model, tmp_path / f"run{run}")
        out.append((digest(tmp_path / f"run{run}"), [h["loss"] for h in res.history]))
    assert out[0][1] == out[1][1]
    assert out[0][0] == out[1][0]
    assert any(f.endswith(".safetensors") for f in out[0][0])


def test_stable_results_strip_run_noise():
    raw = {"date": 1733212345.1, "total_evaluation_time_seconds": "12.5", "pretty_env_info": "host",
           "config": {"model": "<lm_eval.models.huggingface.HFLM object at 0x7f3a2b1c0d90>"},
           "configs": {"arc_easy_local": {"include": "/tmp/flexigpt-tasks-abc123/x.yaml"}},
           "results": {"arc_easy_local": {"acc,none": 0.5}}}
    s = lm_tasks.stable_results(raw, {"/tmp/flexigpt-tasks-abc123": "<task-yamls>"})
    assert "date" not in s and "total_evaluation_time_seconds" not in s and "pretty_env_info" not in s
    assert s["config"]["model"] == "<lm_eval.models.huggingface.HFLM object>"
    assert s["configs"]["arc_easy_local"]["include"] == "<task-yamls>/x.yaml"
    assert s["results"] == raw["results"]


def test_data_dir_is_the_param_only(monkeypatch):
    p = Params({"data": {"dir": "../shared/data"}})
    monkeypatch.delenv("FLEXIGPT_DATA_DIR", raising=False)
    assert data_dir(p) == Path("../shared/data")
    monkeypatch.setenv("FLEXIGPT_DATA_DIR", "/elsewhere")
    with pytest.raises(FlexiError, match="data.dir") as e:
        data_dir(p)
    assert e.value.param == "FLEXIGPT_DATA_DIR"
    monkeypatch.delenv("FLEXIGPT_DATA_DIR")
    with pytest.raises(FlexiError, match="data.dir"):
        data_dir(Params({"data": {"dir": None}}))


def test_temp_workspace_finds_relative_data(tmp_path):
    """`dvc exp run --temp` runs in <root>/.dvc/tmp/exps/<tmp>/: ../shared/data must name the same folder there."""
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "f.jsonl").write_text("{}\n")
    root = tmp_path / "main"
    (root / ".dvc").mkdir(parents=True)
    p = Params({"data": {"dir": "../shared/data"}})
    links = link_exp_data(p, root)
    assert links == [root / ".dvc/tmp/exps/shared", root / ".dvc/tmp/exps/standalone/shared"]
    for temp_ws in (root / ".dvc/tmp/exps/tmpabc123", root / ".dvc/tmp/exps/standalone/tmpdef456"):  # queue, temp
        temp_ws.mkdir()
        assert (temp_ws / "../shared/data/f.jsonl").resolve() == (tmp_path / "shared/data/f.jsonl").resolve()
        assert link_exp_data(p, temp_ws) == []  # never from inside a temp workspace
    assert link_exp_data(p, root) == []  # idempotent
    assert link_exp_data(Params({"data": {"dir": str(tmp_path / "shared/data")}}), root) == []  # absolute


def test_threads_are_a_setting():
    assert resolve_threads(3) == 3
    assert resolve_threads(None, local_processes=1) >= 1
    assert resolve_threads(None, local_processes=10_000) == 1
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(FlexiError, match="compute.threads"):
            resolve_threads(bad)
    info = runtime_info("auto")
    assert info["threads"] == torch.get_num_threads() and info["dtype"] in ("float32", "bfloat16", "float16")
    assert info["device"] in ("cpu", "cuda") and info["cpu"]


def test_stage_without_flexigpt_says_what_to_run(tmp_path):
    """A Python that cannot import flexigpt gets one line naming the fix, not a traceback."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-E", "-S", str(root / "stages" / "prune.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "cannot import flexigpt" in res.stderr and "make repro" in res.stderr
