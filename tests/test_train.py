"""Trainer: learning, frozen base, resume after kill -9, DDP equivalence, NaN guard, bad input."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from flexigpt.model import flexi as fm
from flexigpt.errors import FlexiError
from flexigpt.train import TrainSettings, lr_factor, train, validate
from train_worker import data

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def flexi():
    return fm.build(make_tiny_llama(), fm.prune_spec(6, {2: 1, 4: 5}, fm.LoraSettings(rank=4), gamma_init=0.05))


def settings(**kw):
    base = dict(lr=1e-2, batch_size=8, micro_batch=4, token_budget=8 * 32 * 12, warmup_steps=1, dtype="float32",
                checkpoint_every=0)
    return TrainSettings(**{**base, **kw})


def digest(model, trainable: bool) -> str:
    h = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        if p.requires_grad == trainable:
            h.update(n.encode() + p.detach().numpy().tobytes())
    return h.hexdigest()


def test_few_steps_lower_the_loss_and_base_is_unchanged():
    m = flexi()
    res = train(m, data(), settings())
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    ref = flexi()
    from flexigpt.train import select_trainable

    select_trainable(ref, settings())  # same requires_grad split on the untrained copy
    assert digest(m, trainable=False) == digest(ref, trainable=False)  # base tensors bit-identical
    assert digest(m, trainable=True) != digest(ref, trainable=True)


def test_only_adapters_and_norms_require_grad():
    m = flexi()
    train(m, data(), settings(token_budget=8 * 32))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "flexi_" in n for n in trainable)
    assert any("flexi_attn_out_norm" in n for n in trainable)
    m2 = flexi()
    train(m2, data(), settings(token_budget=8 * 32, train_prenorms=True))
    extra = {n for n, p in m2.named_parameters() if p.requires_grad} - trainable
    assert extra == {f"model.layers.{i}.{k}.weight" for i in (2, 4) for k in ("input_layernorm", "post_attention_layernorm")}


def test_lora_baseline_trains_only_lora():
    m = fm.build(make_tiny_llama(), fm.shortgpt_spec(6, [2, 4], fm.LoraSettings(rank=4)))
    res = train(m, data(), settings(token_budget=8 * 32 * 2))
    assert res.steps == 2
    assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)


def test_kd_term_changes_loss():
    teacher = make_tiny_llama()
    a = train(flexi(), data(), settings(token_budget=8 * 32, kd_weight=0.0)).history[0]["loss"]
    b = train(flexi(), data(), settings(token_budget=8 * 32, kd_weight=1.0), teacher=teacher).history[0]["loss"]
    assert b > a  # KL(teacher || student) >= 0 is added


def test_lr_schedule_warmup_and_cosine():
    s = settings(warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, 10, s) == 0.5 and lr_factor(1, 10, s) == 1.0
    assert lr_factor(2, 10, s) == pytest.approx(1.0) and lr_factor(10, 10, s) == pytest.approx(0.1)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    m = flexi()
    calls = {"n": 0}

    def poison(mod, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 10 else out  # 2 micro-batches per step: NaN from step 6

    m.lm_head.register_forward_hook(poison)
    with pytest.raises(FlexiError) as e:
        train(m, data(), settings(micro_batch=4, checkpoint_every=2), ckpt_dir=tmp_path / "ck")
    assert e.value.param == "train.lr" and "nan" in e.value.problem.lower()
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 4


class _Crash(Exception):
    pass


def _crash_at(step):
    def on_step(rec):
        if rec["step"] == step:
            raise _Crash

    return on_step


def test_checkpoint_from_a_different_plan_is_refused(tmp_path):
    with pytest.raises(_Crash):  # dies after step 3, so the step-2 checkpoint stays behind
        train(flexi(), data(), settings(token_budget=8 * 32 * 4, checkpoint_every=2), ckpt_dir=tmp_path / "ck",
              on_step=_crash_at(3))
    assert (tmp_path / "ck" / "state.json").is_file()
    other = fm.build(make_tiny_llama(), fm.prune_spec(6, {3: 2}, fm.LoraSettings(rank=4)))
    with pytest.raises(FlexiError) as e:
        train(other, data(), settings(token_budget=8 * 32 * 4, checkpoint_every=2), ckpt_dir=tmp_path / "ck")
    assert e.value.param == "train.resume" and "different plan" in e.value.problem


def test_finished_run_removes_its_checkpoint_and_other_settings_start_fresh(tmp_path):
    with pytest.raises(_Crash):
        train(flexi(), data(), settings(token_budget=8 * 32 * 4, checkpoint_every=2), ckpt_dir=tmp_path / "ck",
              on_step=_crash_at(3))
    res = train(flexi(), data(), settings(token_budget=8 * 32 * 4, checkpoint_every=2, lr=5e-3), ckpt_dir=tmp_path / "ck")
    assert res.history[0]["step"] == 1  # another lr: the stale checkpoint is not resumed
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("kw,param", [
    ({"lr": 0.0}, "train.lr"),
    ({"lr": -1e-3}, "train.lr"),
    ({"token_budget": 100}, "train.token_budget"),  # < one batch of 8 x 32
    ({"batch_size": 128, "micro_batch": 4}, "train.batch_size"),  # train split has 64 rows
    ({"optimizer": "lion"}, "train.optimizer"),
    ({"schedule": "step"}, "train.schedule"),
    ({"batch_size": 6, "micro_batch": 4}, "train.batch_size"),
])
def test_bad_settings(kw, param):
    with pytest.raises(FlexiError) as e:
        validate(settings(**kw), n_train=64, seq_len=32)
    assert e.value.param == param and e.value.fix


def _worker(out, *extra, launcher=None, **popen):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "tests" / "train_worker.py"), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow
def test_resume_after_kill_9_matches_uninterrupted(tmp_path):
    ref = _worker(tmp_path / "ref", "--steps", "8")
    assert ref.wait(300) == 0, ref.stderr.read()[-2000:]
    ck = tmp_path / "ck"
    p = _worker(tmp_path / "run", "--steps", "8", "--ckpt", str(ck), "--sleep", "0.5")
    deadline = time.time() + 240
    while not (ck / "state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (ck / "state.json").exists(), p.stderr.read()[-2000:] if p.poll() is not None else "no checkpoint"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "run" / "trainable.safetensors").exists()  # it really died mid-run
    step_at_kill = json.loads((ck / "state.json").read_text())["step"]
    assert 0 < step_at_kill < 8
    again = _worker(tmp_path / "run", "--steps", "8", "--ckpt", str(ck))
    assert again.wait(300) == 0, again.stderr.read()[-2000:]
    a, b = load_file(str(tmp_path / "ref" / "trainable.safetensors")), load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    ha = json.loads((tmp_path / "ref" / "history.json").read_text())
    hb = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [round(h["loss"], 6) for h in ha] == [round(h["loss"], 6) for h in hb]


@pytest.mark.slow
def test_ddp_two_processes_matches_one(tmp_path):
    one = _worker(tmp_path / "one", "--steps", "6", "--micro", "2")
    assert one.wait(300) == 0, one.stderr.read()[-2000:]
    acc = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "configs" / "accelerate_cpu_ddp.yaml")]
    two = _worker(tmp_path / "two", "--steps", "6", "--micro", "2", launcher=acc)
    assert two.wait(600) == 0, two.stderr.read()[-3000:]
    h1 = [h["loss"] for h in json.loads((tmp_path / "one" / "history.json").read_text())]
    h2 = [h["loss"] for h in json.loads((tmp_path / "two" / "history.json").read_text())]
    assert len(h1) == len(h2) == 6
    for x, y in zip(h1, h2):
        assert abs(x - y) < 1e-4, (h1, h2)
    assert h1[-1] < h1[0]


def test_settings_from_params_reads_train_group_and_seed():
    from flexigpt.config import Params
    from flexigpt.train import settings_from_params

    s = settings_from_params(Params({"train": {"lr": 0.01, "norm_lr_mult": 10.0, "token_budget": 4096, "seed": 3}}))
    assert (s.lr, s.norm_lr_mult, s.token_budget, s.seed) == (0.01, 10.0, 4096, 3)
    with pytest.raises(FlexiError) as e:
        settings_from_params(Params({"train": {"seed": -1}}))
    assert e.value.param == "train.seed"


def test_norm_lr_multiplier_reaches_gamma():
    from flexigpt.train import make_optimizer, select_trainable

    m = flexi()
    lora, norms = select_trainable(m, settings(norm_lr_mult=10.0))
    opt = make_optimizer(lora, norms, settings(norm_lr_mult=10.0))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lrs[id(p)] for _, p in norms} == {0.1} and {lrs[id(p)] for _, p in lora} == {0.01}
