"""Issue 19: no data loss from a mistyped path, no traceback from a bad input, no silent wrong result.

Every data-loss case plants a sentinel file and asserts it survives; every bad input asserts one
clean error naming the param (exit 2 for stages and the CLI) and no new files.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_llama
from flexigpt.config import Params, check_float
from flexigpt.errors import FlexiError
from flexigpt.fileio import MARKER, atomic_dir, atomic_file, clean_stale_temps, is_ours
from helpers import ROOT, assert_clean_error, base_params, make_tokenizer, run_stage, save_tiny_model_dir

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def sentinel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "precious.txt"
    f.write_text("the user's own file\n")
    return f


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- data loss: the atomic writers ----------------------------------------------------------------------

def test_atomic_dir_never_replaces_a_folder_it_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no dvc.lock here
    keep = sentinel(tmp_path / "somewhere")
    with pytest.raises(FlexiError) as e:
        with atomic_dir(tmp_path / "somewhere") as tmp:
            (tmp / "plan.json").write_text("{}")
    assert "did not write" in e.value.problem
    assert keep.read_text() == "the user's own file\n"
    assert tree(tmp_path) == {"somewhere", "somewhere/precious.txt"}  # no temp folder left either


def test_atomic_dir_replaces_its_own_folder_and_marks_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("one", "two"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x.txt").write_text(text)
    assert (tmp_path / "out" / "x.txt").read_text() == "two" and (tmp_path / "out" / MARKER).is_file()
    assert tree(tmp_path) == {"out", "out/x.txt", f"out/{MARKER}"}


def test_atomic_file_never_replaces_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keep = sentinel(tmp_path / "metrics_dir")
    with pytest.raises(FlexiError) as e:
        with atomic_file(tmp_path / "metrics_dir") as tmp:
            tmp.write_text("{}")
    assert "existing folder" in e.value.problem and keep.is_file()


def test_a_dvc_lock_output_counts_as_ours(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sentinel(tmp_path / "artifacts" / "plan")
    assert not is_ours(tmp_path / "artifacts" / "plan")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prune:\n    outs:\n    - path: artifacts/plan\n")
    assert is_ours(tmp_path / "artifacts" / "plan")


def test_stale_temp_folders_are_cleaned(tmp_path):
    (tmp_path / ".trained.tmp-abc").mkdir()
    (tmp_path / ".trained.tmp-abc" / "big.safetensors").write_bytes(b"0" * 100)
    (tmp_path / ".plan.old-123").mkdir()
    (tmp_path / "plan").mkdir()
    gone = clean_stale_temps(tmp_path)
    assert len(gone) == 2 and tree(tmp_path) == {"plan"}


# -- data loss: stages and the CLI --------------------------------------------------------------------

def _prune_params(tmp: Path, **paths) -> dict:
    p = base_params(tmp)
    p["paths"].update(paths)
    return p


def test_plan_path_outside_the_project_is_refused_before_any_work(tmp_path):
    import yaml

    keep = sentinel(tmp_path / "somewhere")
    p = base_params(tmp_path)
    p["paths"] = dict(yaml.safe_load((ROOT / "params.yaml").read_text())["paths"], plan=str(tmp_path / "somewhere"))
    res = run_stage("prune", p, tmp_path)  # the project's own relative paths, one output outside it
    assert_clean_error(res, "paths.plan")
    assert "not a path inside the project" in res.stderr and keep.is_file()
    assert tree(tmp_path / "somewhere") == {"precious.txt"}


def test_plan_path_on_a_foreign_folder_is_refused_even_when_outside_is_allowed(tmp_path):
    keep = sentinel(tmp_path / "somewhere")
    res = run_stage("prune", _prune_params(tmp_path, plan=str(tmp_path / "somewhere")), tmp_path)
    assert_clean_error(res, "paths.plan")
    assert "did not write" in res.stderr and keep.is_file()


def test_metrics_path_that_is_a_folder_is_refused(tmp_path):
    keep = sentinel(tmp_path / "mine")
    res = run_stage("prepare_calibration", _prune_params(tmp_path, data_metrics=str(tmp_path / "mine")), tmp_path)
    assert_clean_error(res, "paths.data_metrics")
    assert keep.is_file() and tree(tmp_path / "mine") == {"precious.txt"}


def test_fetch_text_never_deletes_an_existing_folder(tmp_path):
    keep = sentinel(tmp_path / "corpus")
    res = subprocess.run([sys.executable, "-m", "flexigpt.pipeline.cli", "fetch-text", "hf:wikitext:x:test",
                          "--out", str(tmp_path / "corpus")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "--out" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert keep.is_file()


# -- silent wrong results in training ----------------------------------------------------------------

def _flexi():
    from flexigpt.model import flexi as fm

    return fm.build(make_tiny_llama(), fm.prune_spec(6, {2: 1, 4: 5}, fm.LoraSettings(rank=4), gamma_init=0.05))


def _settings(**kw):
    from flexigpt.train import TrainSettings

    base = dict(lr=1e-2, batch_size=8, micro_batch=4, token_budget=8 * 32 * 4, warmup_steps=1, dtype="float32",
                checkpoint_every=2)
    return TrainSettings(**{**base, **kw})


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(seed))


def test_a_checkpoint_is_not_resumed_across_other_data(tmp_path, caplog):
    from flexigpt.train import train

    def crash(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_flexi(), _ids(0), _settings(), ckpt_dir=tmp_path / "ck", on_step=crash)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 2
    res = train(_flexi(), _ids(1), _settings(), ckpt_dir=tmp_path / "ck")  # same shape, other tokens
    assert res.history[0]["step"] == 1 and "starting fresh" in caplog.text
    with pytest.raises(KeyboardInterrupt):
        train(_flexi(), _ids(0), _settings(), ckpt_dir=tmp_path / "ck2", on_step=crash)
    res = train(_flexi(), _ids(0), _settings(), ckpt_dir=tmp_path / "ck2")  # same data and weights: resumes
    assert res.history[0]["step"] == 1 and len(res.history) == 4 and res.history[2]["step"] == 3


def test_an_update_that_breaks_the_weights_at_the_last_step_is_an_error(tmp_path):
    from flexigpt.train import train

    m = _flexi()
    lora_b = next(p for n, p in m.named_parameters() if "lora_B" in n)
    lora_b.register_hook(lambda g: g * float("nan"))  # the loss stays finite; the one update poisons the weights
    with pytest.raises(FlexiError) as e:
        train(m, _ids(0), _settings(token_budget=8 * 32, checkpoint_every=0))
    assert e.value.param == "train.lr" and "NaN/inf" in e.value.problem


def test_a_garbage_state_json_starts_clean(tmp_path, caplog):
    from flexigpt.train import train

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.json").write_text("{not json")
    res = train(_flexi(), _ids(0), _settings(checkpoint_every=0), ckpt_dir=tmp_path / "ck")
    assert res.history[0]["step"] == 1 and "unreadable state.json" in caplog.text


def test_an_absurd_token_budget_is_refused():
    from flexigpt.train import validate

    with pytest.raises(FlexiError) as e:
        validate(_settings(token_budget=10**15), 512, 512)
    assert e.value.param == "train.token_budget" and "passes over the train split" in e.value.problem


def test_a_deleted_section_is_an_error_not_hidden_defaults(tmp_path):
    from flexigpt.train import TrainSettings

    p = yaml_params(tmp_path, drop="train")
    with pytest.raises(FlexiError) as e:
        TrainSettings.from_params(p)
    assert e.value.param == "train" and "section missing" in e.value.problem


def yaml_params(tmp: Path, drop: str) -> Params:
    import yaml

    d = yaml.safe_load((ROOT / "params.yaml").read_text())
    del d[drop]
    (tmp / "params.yaml").write_text(yaml.safe_dump(d))
    return Params.load(tmp / "params.yaml")


@pytest.mark.parametrize("value,fix", [("1e-3", "0.001"), ("5e-5", "5e-05"), ("0.5", "0.5")])
def test_a_number_yaml_read_as_text_says_how_to_write_it(value, fix):
    with pytest.raises(FlexiError) as e:
        check_float("train.lr", value)
    assert "is the string" in e.value.problem and fix in e.value.fix


# -- data ---------------------------------------------------------------------------------------------

def test_duplicate_documents_never_land_in_two_splits():
    from flexigpt.data.packing import SplitSpec, build_splits

    from helpers import corpus

    docs = corpus(80)
    docs = docs + docs[:40]  # 40 duplicates
    spec = SplitSpec(seq_len=16, n_calibration=8, train_tokens=16 * 40, n_heldout=2, seed=0)
    _, stats = build_splits(docs, None, make_tokenizer(), spec)
    assert stats["pool_duplicate_docs_dropped"] == 40
    assert not set(stats["calibration_doc_keys"]) & set(stats["train_doc_keys"])


def test_null_text_rows_are_an_error(tmp_path):
    from flexigpt.data.text import read_source

    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n{"text": null}\n{"text": 3}\n')
    with pytest.raises(FlexiError) as e:
        read_source("c.jsonl", tmp_path, "text", "calibration.source")
    assert e.value.param == "calibration.source" and "2 row(s)" in e.value.problem and "line 2" in e.value.problem


def test_a_corrupt_split_file_is_caught_by_its_manifest_sha(tmp_path):
    from flexigpt.data.splits import load_split

    save_file({"input_ids": torch.arange(64, dtype=torch.int32).view(4, 16)}, str(tmp_path / "heldout.safetensors"))
    from flexigpt.fileio import sha256_file

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"splits": {"heldout": {"sha256": sha256_file(tmp_path / "heldout.safetensors")}}}))
    assert load_split(tmp_path, "heldout").shape == (4, 16)
    raw = bytearray((tmp_path / "heldout.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "heldout.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FlexiError) as e:
        load_split(tmp_path, "heldout")
    assert e.value.param == "paths.data" and "sha256" in e.value.problem


def test_same_source_spelled_differently_is_one_source(tmp_path):
    from flexigpt.data.splits import _same_source

    assert _same_source("./calibration/x.jsonl", "calibration/x.jsonl", tmp_path)
    assert not _same_source("a.jsonl", "b.jsonl", tmp_path)


def test_hub_sources_are_refused_in_params_dvc_reads():
    from flexigpt.data.splits import CalibrationSettings, HeldoutSettings

    for cls, key in ((CalibrationSettings, "calibration.source"), (HeldoutSettings, "heldout.source")):
        with pytest.raises(FlexiError) as e:
            cls(source="hf:wikitext:wikitext-2-raw-v1:test")
        assert e.value.param == key and "fetch-text" in e.value.fix


# -- model folders -------------------------------------------------------------------------------------

def test_pickle_only_folder_is_refused_in_one_line(tmp_path):
    from flexigpt.model.importer import resolve_source

    d = save_tiny_model_dir(tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FlexiError) as e:
        resolve_source(str(d))
    assert "pickled weights are refused" in e.value.problem and "safetensors" in e.value.fix


def test_corrupt_safetensors_and_missing_tokenizer_are_clean_errors(tmp_path):
    from flexigpt.model.importer import resolve_source

    d = save_tiny_model_dir(tmp_path / "m")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(FlexiError) as e:
        resolve_source(str(d))
    assert "not a readable safetensors file" in e.value.problem
    d2 = save_tiny_model_dir(tmp_path / "m2")
    for f in d2.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    with pytest.raises(FlexiError) as e:
        resolve_source(str(d2))
    assert "no tokenizer files" in e.value.problem


def test_a_missing_relative_folder_is_not_called_a_hub_id(tmp_path, monkeypatch):
    from flexigpt.model.importer import resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FlexiError) as e:
        resolve_source("models/llama-typo")
    assert "local folder" in e.value.problem and "does not exist" in e.value.problem


def test_corrupt_gguf_weights_are_flagged_by_the_sanity_perplexity(caplog):
    from flexigpt.model.importer import sanity_ppl

    m = make_tiny_llama(vocab=128)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(100.0)  # garbage weights: confident and wrong
    ppl = sanity_ppl(m, make_tokenizer())
    assert ppl > 100 and "may be corrupt" in caplog.text


def test_an_evaluated_folder_without_a_model_is_an_error(tmp_path):
    from flexigpt.variants import check_folder

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0")
    with pytest.raises(FlexiError) as e:
        check_folder("evil", tmp_path / "etc")
    assert e.value.param == "evaluate.variants.evil" and "holds no model" in e.value.problem


def test_an_eval_window_longer_than_the_model_is_refused_up_front():
    from flexigpt.evaluate.suite import EvaluateSettings

    s = EvaluateSettings(variants={"dense": "artifacts/base_model"}, ppl_windows=[16384, 512])
    with pytest.raises(FlexiError) as e:
        s.check_model(8192)
    assert e.value.param == "evaluate.ppl_windows" and "16384" in e.value.problem


def test_a_corrupt_compact_manifest_is_a_clean_error(tmp_path):
    import flexigpt

    flexigpt.save(_flexi(), tmp_path / "c")
    (tmp_path / "c" / "flexigpt.json").write_text('{"format": "flexigpt-compact/1", "spe')
    with pytest.raises(FlexiError) as e:
        flexigpt.load(tmp_path / "c")
    assert e.value.param == "checkpoint"


# -- leftovers -----------------------------------------------------------------------------------------

def test_mlflow_store_is_private_and_dead_runs_are_closed(tmp_path):
    import mlflow

    from flexigpt.track import tracking
    from flexigpt.track.uri import private_sqlite

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    private_sqlite(uri)
    assert stat.S_IMODE((tmp_path / "mlflow.db").stat().st_mode) == 0o600
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("t")
    client = mlflow.MlflowClient()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = tracking._pid_tag(dead.pid)
    r1 = client.create_run(exp.experiment_id, tags={tracking.PID_TAG: host})  # a killed stage's run
    r2 = client.create_run(exp.experiment_id, tags={tracking.PID_TAG: tracking._pid_tag()})  # a live one
    assert tracking.close_dead_runs(client, exp.experiment_id) == [r1.info.run_id]
    assert client.get_run(r1.info.run_id).info.status == "KILLED"
    assert client.get_run(r2.info.run_id).info.status == "RUNNING"


def test_a_second_stage_in_the_same_project_is_refused(tmp_path, monkeypatch):
    from flexigpt.pipeline.stagekit import stage_lock

    monkeypatch.chdir(tmp_path)
    held = stage_lock("prune")
    code = ("import sys; sys.path.insert(0, %r)\nfrom flexigpt.pipeline.stagekit import stage_lock\n"
            "from flexigpt.errors import FlexiError\ntry:\n    stage_lock('svd_init')\nexcept FlexiError as e:\n"
            "    print(e); sys.exit(2)\n") % str(ROOT)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    held.close()
    assert res.returncode == 2 and "stage prune" in res.stdout, res.stdout + res.stderr


def test_training_errors_pass_through_accelerate_with_their_status(tmp_path):
    """Under the accelerate wrapper a clean stage error stays exit 2 and one message, no launcher traceback."""
    d = save_tiny_model_dir(tmp_path / "model")
    p = base_params(tmp_path, str(d))
    p["paths"]["base_model"] = str(d)
    p["mode"] = "prune"
    res = run_stage("train_adapters", p, tmp_path, args=["--variant", "lora_baseline"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "CalledProcessError" not in res.stderr, res.stderr[-3000:]
    assert "error:" in res.stderr


def test_inputs_digest_samples_large_frozen_tensors_in_bounds():
    """Sample indices stay in range past float32's exact integers (a 28M-element embedding broke linspace)."""
    from torch import nn

    from flexigpt.train import inputs_digest

    m = nn.Module()
    m.big = nn.Parameter(torch.zeros(2**24 + 7, dtype=torch.float16), requires_grad=False)
    a = inputs_digest(m, torch.zeros(2, 4, dtype=torch.long))
    with torch.no_grad():
        m.big[-1] = 1.0  # the last element is sampled
    assert inputs_digest(m, torch.zeros(2, 4, dtype=torch.long)) != a
