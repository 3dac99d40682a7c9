"""benchmarks/gpu_check.py: its CPU smoke run (--tiny), its imports on a GPU image without the pipeline tools,
the launcher's world-size check, and the FSDP wrap policy that keeps weight-shared blocks in one unit."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flexigpt.errors import FlexiError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
# part -> numbers that must be finite and > 0
NUMBERS = {
    "bi_scoring": ("bi_tokens_per_s", "forward_tokens_per_s", "bi_vs_forward", "bi_s", "forward_s"),
    "base_selection": ("seconds",),
    "train_step": ("flexigpt_step_s", "dense_lora_step_s", "flexigpt_tokens_per_s", "dense_lora_tokens_per_s",
                   "flexigpt_vs_dense_lora"),
    "merged_forward": ("merged_s", "dense_s", "merged_vs_dense"),
    "decode": ("plain_tokens_per_s", "speculative_tokens_per_s", "speculative_speedup"),
    "fsdp": ("final_loss", "nll_trained", "nll_loaded", "seconds"),
}
GPU_CHECK_MODULES = ("flexigpt", "flexigpt.variants", "flexigpt.compress.distance", "flexigpt.compress.importance",
                     "flexigpt.compress.plan", "flexigpt.model.checkpoint", "flexigpt.model.flexi",
                     "flexigpt.model.arch", "flexigpt.model.forward", "flexigpt.serve.speculative",
                     "flexigpt.serve.speed", "flexigpt.train")
# Packages missing from a GPU image: importing one fails; probing for one (importlib.util.find_spec, as
# accelerate and transformers do for optional integrations) says "not installed", as it would there.
BLOCKER = textwrap.dedent("""
    import importlib.util, sys
    BLOCKED = ("dvc", "mlflow", "lm_eval", "datasets")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{name} is blocked (a GPU image without it)", name=name)
            return None

    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: (
        None if name.partition(".")[0] in BLOCKED else _find_spec(name, package))
    sys.meta_path.insert(0, Blocker())
""")


@pytest.mark.slow
def test_tiny_run_reports_every_part(tmp_path):
    """The whole script at tiny shapes on the CPU: every part ok, finite positive numbers, identical decode."""
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "tiny" and r["ok"] is True
    assert set(r["parts"]) == set(NUMBERS)
    for part, keys in NUMBERS.items():
        got = r["parts"][part]
        assert got["ok"] is True, (part, got)
        for k in keys:
            assert isinstance(got[k], (int, float)) and math.isfinite(got[k]) and got[k] > 0, (part, k, got.get(k))
    assert r["parts"]["bi_scoring"]["scores_finite"] and len(r["parts"]["bi_scoring"]["scores"]) == 8
    dec = r["parts"]["decode"]
    assert dec["identical"] is True and dec["acceptance_rate"] > 0  # FlexiGPT as built: the draft agrees often
    f = r["parts"]["fsdp"]
    assert f["loads"] and f["ties_loaded"] and f["ties_in_memory"] and f["nll_matches"]
    assert f["shared_not_stored_once"] == [] and f["frozen_base_changed"] == [] and f["adapters_changed"] > 0
    assert f["fsdp_exercised"] is False and "FSDP not exercised on CPU" in f["note"]  # and it says why
    assert "FSDP not exercised on CPU" in res.stdout
    assert set(r["targets"]) == {"bi_scoring", "base_selection", "train_step"}
    assert all(t["meaningful"] is False for t in r["targets"].values())
    assert "gpu_check: all parts ok" in res.stdout


def test_gpu_check_imports_without_pipeline_tools():
    """flexigpt and every module gpu_check uses import, and `gpu_check.py --help` runs, without dvc, mlflow,
    lm_eval or datasets; none of them is loaded on the way."""
    code = BLOCKER + textwrap.dedent(f"""
        import importlib, runpy
        for m in {GPU_CHECK_MODULES!r}:
            importlib.import_module(m)
        sys.argv = [{str(SCRIPT)!r}, "--help"]
        try:
            runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), e.code
        loaded = sorted(k for k in sys.modules if k.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("IMPORTS-OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORTS-OK" in res.stdout and "usage:" in res.stdout and "--tiny" in res.stdout


def test_blocker_really_blocks():
    """The blocker itself: importing a blocked package fails (so the test above can fail)."""
    code = BLOCKER + "import mlflow\n"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "blocked" in res.stderr


# -- the launcher's world-size check ------------------------------------------------------------

def _config(tmp_path: Path, name: str, **changes) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    cfg.update(changes)
    path = tmp_path / f"accelerate_{len(list(tmp_path.glob('accelerate_*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_relaunch_refuses_fsdp_world_larger_than_gpus(tmp_path, monkeypatch, capsys):
    import accelerate.commands.launch as acl
    import torch

    from flexigpt.pipeline import launch

    config = _config(tmp_path, "accelerate_fsdp.yaml", num_processes=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train_launch": {"config": str(config)}}))
    for k in ("LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(launch.LAUNCHED_ENV, "0")  # restored afterwards, whatever relaunch sets
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def launched_anyway(*a, **k):
        raise AssertionError("accelerate was started")
    monkeypatch.setattr(acl, "launch_command", launched_anyway)
    with pytest.raises(SystemExit) as e:
        launch.relaunch(argv=["stages/train_adapters.py"], params_path=str(params))
    assert e.value.code == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("error: train_launch.config: "), err
    assert "FSDP" in first and "world size 1" in first and "0 CUDA device" in first, err
    assert "fix:" in err and "accelerate_single.yaml" in err and "Traceback" not in err


def test_check_world_names_the_gpu_count_in_the_fix(tmp_path):
    from flexigpt.pipeline.launch import check_world

    config = _config(tmp_path, "accelerate_cpu_ddp.yaml", num_processes=4)  # MULTI_GPU
    with pytest.raises(FlexiError) as e:
        check_world(config, devices=2)
    assert e.value.param == "train_launch.config"
    assert "world size 4" in e.value.problem and "2 CUDA device" in e.value.problem
    assert "num_processes: 2" in e.value.fix


@pytest.mark.parametrize("name,changes,devices", [
    ("accelerate_cpu_ddp.yaml", {}, 0),                      # CPU DDP over gloo: MULTI_GPU with no GPU at all
    ("accelerate_single.yaml", {}, 0),
    ("accelerate_fsdp.yaml", {"num_processes": 1}, 1),
    ("accelerate_fsdp.yaml", {"use_cpu": True}, 0),
])
def test_check_world_allows(tmp_path, name, changes, devices):
    from flexigpt.pipeline.launch import check_world

    check_world(_config(tmp_path, name, **changes), devices=devices)


def test_check_world_refuses_fsdp_beyond_one_process(tmp_path):
    """Rank 0 alone measures heldout PPL and saves after training: with sharded weights that would hang or
    save shards, so FSDP is one process for now, even with enough GPUs."""
    from flexigpt.pipeline.launch import check_world

    with pytest.raises(FlexiError) as e:
        check_world(_config(tmp_path, "accelerate_fsdp.yaml", num_processes=4), devices=8)
    assert "world size 4" in e.value.problem and "num_processes: 1" in e.value.fix and "MULTI_GPU" in e.value.fix


def test_check_world_refuses_broken_yaml(tmp_path):
    from flexigpt.pipeline.launch import check_world

    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: [FSDP\n")
    with pytest.raises(FlexiError) as e:
        check_world(bad, devices=0)
    assert e.value.param == "train_launch.config"


# -- FSDP and weight-shared blocks (flexigpt.train.fsdp_wrap_policy) ------------------------------------

def _flexi():
    """A tiny FlexiGPT whose positions 2 and 4 share blocks 1's and 5's linears; embeddings untied, as in LLaMA-2."""
    import torch
    from conftest import make_tiny_llama
    from transformers import LlamaForCausalLM

    from flexigpt.model import flexi as fm

    cfg = make_tiny_llama().config
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    return fm.build(LlamaForCausalLM(cfg).eval(), fm.prune_spec(6, {2: 1, 4: 5}, fm.LoraSettings(rank=4),
                                                               gamma_init=0.05))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp_wrap_policy_leaves_weight_shared_blocks_to_the_root_unit():
    from conftest import make_tiny_llama

    from flexigpt.model.arch import arch_of
    from flexigpt.train import fsdp_wrap_policy

    assert fsdp_wrap_policy(make_tiny_llama()) is None  # nothing shared: the config's policy stays
    model = _flexi()
    policy = fsdp_wrap_policy(model)
    wrapped = [i for i, b in enumerate(arch_of(model).blocks()) if policy(b, recurse=False, nonwrapped_numel=0)]
    assert wrapped == [0, 3]  # 1-2 and 4-5 share linears
    assert policy(model, recurse=True, nonwrapped_numel=0)  # the walk still descends


FSDP_WORKER = textwrap.dedent("""
    import functools, os, sys, tempfile
    sys.path.insert(0, {tests!r})
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullStateDictConfig
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from test_gpu_check import _flexi
    from flexigpt.model import checkpoint
    from flexigpt.train import TrainSettings, fsdp_wrap_policy, lm_loss, select_trainable

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = _flexi()
    select_trainable(model, TrainSettings())
    policy = fsdp_wrap_policy(model) if os.environ["POLICY"] == "project" else \\
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={{LlamaDecoderLayer}})
    # what accelerate's FSDP1 prepare builds from configs/accelerate_fsdp.yaml
    w = FSDP(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
             device_id=torch.device("cpu"))
    FSDP.set_state_dict_type(w, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True))
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        lm_loss(w(input_ids=ids, use_cache=False).logits, ids).backward()
        opt.step()
        opt.zero_grad()
    if dist.get_world_size() == 1:  # the train stage's save: the unwrapped model, compact
        d = tempfile.mkdtemp()
        checkpoint.save(w.module, d)
        checkpoint.load(d)
    print("FSDP-OK", flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_fsdp_trains_and_saves_weight_shared_blocks(tmp_path, procs):
    """Torch FSDP (CPU, gloo) as accelerate wraps with configs/accelerate_fsdp.yaml: with the config's one unit
    per block, 2 ranks fail in forward and 1 rank saves an unloadable checkpoint; with fsdp_wrap_policy both work.
    (accelerate itself runs no FSDP without a GPU; benchmarks/gpu_check.py part f checks it there.)"""
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER.format(tests=str(ROOT / "tests")))
    results = {}
    for policy in ("config", "project"):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                              f"--master_port={_free_port()}", str(worker)], cwd=ROOT, env={**ENV, "POLICY": policy,
                                                                                "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=300)
        results[policy] = res.returncode == 0 and "FSDP-OK" in res.stdout
        if policy == "project":
            assert results[policy], (res.stdout + res.stderr)[-3000:]
    assert results == {"config": False, "project": True}
