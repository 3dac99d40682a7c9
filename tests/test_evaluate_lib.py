"""Evaluation library: local lm-eval task YAMLs, paper metrics, PPL protocol, cost accounting.

Everything runs on tiny random models and small fake jsonl files written here (never on
../shared/data), so the file stays well under a minute.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import bos_tokenizer, make_tiny_llama, make_tiny_opt
from helpers import WORDS, make_tokenizer

from flexigpt.evaluate import cost, lm_tasks, perplexity
from flexigpt.model.arch import arch_of
from flexigpt.model import flexi as fm
from flexigpt.errors import FlexiError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# -- fake data in the schemas of ../shared/data -----------------------------------------------------

def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def fake_rows(task: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if task in ("arc_easy", "arc_challenge"):
            rows.append({"id": f"q{i}", "question": _words(i, 6) + "?",
                         "choices": {"text": [_words(i + j, 3) for j in range(4)], "label": list("ABCD")},
                         "answerKey": "ABCD"[i % 4]})
        elif task == "piqa":
            rows.append({"goal": _words(i, 5), "sol1": _words(i + 1, 4), "sol2": _words(i + 2, 4), "label": i % 2})
        elif task == "winogrande":
            rows.append({"sentence": f"{_words(i, 3)} _ {_words(i + 1, 3)}.", "option1": "fox", "option2": "dog",
                         "answer": str(1 + i % 2)})
        elif task == "hellaswag":
            rows.append({"ind": i, "activity_label": "Rivers", "ctx_a": _words(i, 5) + ".", "ctx_b": "the",
                         "ctx": _words(i, 5) + ". the", "endings": [_words(i + j, 4) for j in range(4)],
                         "label": str(i % 4), "split": "val"})
        elif task == "boolq":
            rows.append({"question": _words(i, 5), "passage": _words(i + 3, 12), "idx": i, "label": i % 2})
        elif task == "wikitext":
            rows.append({"page": f" = {_words(i, 2)} = \n \n {_words(i, 30)} . \n"})
    return rows


def write_fake_data(root: Path, tasks=tuple(lm_tasks.ALL_TASKS), n: int = 5) -> Path:
    for t in tasks:
        p = root / lm_tasks.ALL_TASKS[t].data_file
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in fake_rows(t, n)))
    return root


def write_fake_wikitext2(root: Path, n_rows: int = 40) -> Path:
    p = root / perplexity.WIKITEXT2_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"text": ""} if i % 5 == 0 else {"text": f" {_words(i, 9)} . \n"} for i in range(n_rows)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# -- task YAMLs ---------------------------------------------------------------------------------------

def test_local_yamls_include_builtin_and_override_only_data(tmp_path):
    data = write_fake_data(tmp_path / "data")
    names = lm_tasks.write_local_task_yamls(data, tmp_path / "yaml")
    assert names == {t: f"{t}_local" for t in lm_tasks.ALL_TASKS}
    builtin_root = lm_tasks.lm_eval_tasks_dir()
    for task, local in names.items():
        f = tmp_path / "yaml" / f"{local}.yaml"
        cfg = yaml.safe_load(f.read_text())
        assert set(cfg) == {"include", "task", "dataset_path", "dataset_name", "dataset_kwargs",
                            "training_split", "validation_split", "test_split"}
        inc = Path(cfg["include"])
        assert inc.is_file() and inc.is_relative_to(builtin_root) and inc.name.endswith(".yaml")
        assert cfg["task"] == local and cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
        split = "test" if task in ("arc_easy", "arc_challenge", "wikitext") else "validation"
        assert cfg["dataset_kwargs"] == {"data_files": {split: str((data / lm_tasks.ALL_TASKS[task].data_file).resolve())}}
        assert cfg[f"{split}_split"] == split
        assert all(cfg[k] is None for k in lm_tasks.SPLITS if k != f"{split}_split")


def test_local_tasks_load_through_task_manager(tmp_path):
    """Includes resolve (arc_challenge -> arc_easy -> built-in, `!function utils.process_docs`)."""
    from lm_eval.tasks import TaskManager

    data = write_fake_data(tmp_path / "data", n=3)
    names = lm_tasks.write_local_task_yamls(data, tmp_path / "yaml")
    loaded = TaskManager(include_path=str(tmp_path / "yaml"), include_defaults=False).load(list(names.values()))
    tasks = loaded["tasks"]
    assert set(tasks) == set(names.values())
    for task, local in names.items():
        assert len(tasks[local].eval_docs) == 3, task
    hs = tasks["hellaswag_local"]
    doc = hs.eval_docs[1]
    assert doc["query"].startswith("Rivers: ") and doc["gold"] == 1  # built-in utils.process_docs ran
    arc = tasks["arc_challenge_local"]
    assert arc.doc_to_text(arc.eval_docs[0]).startswith("Question: ") and arc.doc_to_target(arc.eval_docs[0]) == 0
    wg = tasks["winogrande_local"]
    assert wg.doc_to_choice(wg.eval_docs[0]) == [f"{_words(0, 3)} fox", f"{_words(0, 3)} dog"]
    assert tasks["wikitext_local"].OUTPUT_TYPE == "loglikelihood_rolling"


# -- metrics -----------------------------------------------------------------------------------------

RAW = {"results": {
    "arc_easy_local": {"alias": "arc_easy_local", "sample_len": 10, "acc,none": 0.50, "acc_stderr,none": 0.01,
                       "acc_norm,none": 0.40, "acc_norm_stderr,none": 0.02},
    "arc_challenge_local": {"acc,none": 0.20, "acc_stderr,none": "N/A", "acc_norm,none": 0.30},
    "piqa_local": {"acc,none": 0.60, "acc_norm,none": 0.70},
    "winogrande_local": {"acc,none": 0.55, "acc_stderr,none": 0.03},
    "hellaswag_local": {"acc,none": 0.35, "acc_norm,none": 0.45},
    "boolq_local": {"acc,none": 0.99},
}}


def test_paper_average_hand_computed():
    # acc_norm for ARC-e/ARC-c/PIQA/HellaSwag, acc for WinoGrande; BoolQ (0.99) excluded
    assert lm_tasks.paper_average(RAW) == pytest.approx((0.40 + 0.30 + 0.70 + 0.55 + 0.45) / 5)
    own = {"tasks": lm_tasks.task_metrics(RAW)}
    assert lm_tasks.paper_average(own) == pytest.approx(0.48)


def test_paper_average_needs_all_five():
    part = {"tasks": {"arc_easy": {"acc_norm": 0.5}}}
    with pytest.raises(FlexiError, match="hellaswag"):
        lm_tasks.paper_average(part)


# -- bad inputs ----------------------------------------------------------------------------------------

def test_unknown_task_lists_valid_ones(tmp_path):
    with pytest.raises(FlexiError) as e:
        lm_tasks.run_zero_shot(None, None, ["arc_easy", "mmlu"], tmp_path)  # no model needed to fail
    assert e.value.param == "evaluate.tasks" and "mmlu" in e.value.problem
    assert all(t in e.value.fix for t in lm_tasks.TASKS)


def test_missing_data_file_is_named(tmp_path):
    write_fake_data(tmp_path, tasks=("arc_easy",))
    with pytest.raises(FlexiError) as e:
        lm_tasks.run_zero_shot(None, None, ["arc_easy", "piqa"], tmp_path)
    assert e.value.param == "data.dir" and str((tmp_path / "piqa" / "validation.jsonl").resolve()) in e.value.problem
    with pytest.raises(FlexiError, match="piqa/validation.jsonl"):
        lm_tasks.write_local_task_yamls(tmp_path, tmp_path / "yaml", ["piqa"])


@pytest.mark.parametrize("limit", [0, -3, {"arc_easy": 0}, 2.5, True, "10"])
def test_bad_limit(tmp_path, limit):
    write_fake_data(tmp_path, tasks=("arc_easy",))
    with pytest.raises(FlexiError) as e:
        lm_tasks.run_zero_shot(None, None, ["arc_easy"], tmp_path, limit=limit)
    assert e.value.param.startswith("evaluate.limit")


def test_limit_forms():
    assert lm_tasks.check_limits(None, ["piqa"]) == {"piqa": None}
    assert lm_tasks.check_limits(7, ["piqa", "boolq"]) == {"piqa": 7, "boolq": 7}
    assert lm_tasks.check_limits({"boolq": 3}, ["piqa", "boolq"]) == {"piqa": None, "boolq": 3}
    with pytest.raises(FlexiError, match="not evaluated"):
        lm_tasks.check_limits({"hellaswag": 3}, ["piqa"])


# -- perplexity protocol --------------------------------------------------------------------------------

def test_cut_windows_non_overlapping_last_partial_dropped():
    w = perplexity.cut_windows(torch.arange(11), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert perplexity.cut_windows(torch.arange(11), 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert perplexity.cut_windows(torch.arange(2), 3).shape == (0, 3)


def test_wikitext2_token_ppl_protocol(tmp_path):
    data = write_fake_wikitext2(tmp_path)
    model, tok = make_tiny_llama(), make_tokenizer()
    text = "\n\n".join(json.loads(line)["text"] for line in (data / perplexity.WIKITEXT2_FILE).read_text().splitlines())
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    window = 30
    n = ids.numel() // window
    assert n >= 3 and ids.numel() % window  # there is a partial window to drop
    r = perplexity.wikitext2_token_ppl(model, tok, data, window, batch_size=2, dtype="float32")
    assert (r["windows"], r["tokens"], r["predicted_tokens"]) == (n, n * window, n * (window - 1))
    assert r["dropped_tokens"] == ids.numel() - n * window and r["total_tokens"] == ids.numel()
    assert r["protocol"] == (r"wikitext2-raw test, rows joined by \n\n, non-overlapping 30-token windows, "
                             "last partial dropped")
    with torch.no_grad():  # independent check: HF's own shifted loss over the same windows
        ref = model(input_ids=ids[: n * window].view(n, window), labels=ids[: n * window].view(n, window)).loss
    assert r["ppl"] == pytest.approx(math.exp(ref.item()), rel=1e-5)
    part = perplexity.wikitext2_token_ppl(model, tok, data, window, dtype="float32", max_windows=1)
    assert part["windows"] == 1 and f"first 1 of {n} windows only" in part["protocol"]
    bf16 = perplexity.wikitext2_token_ppl(model, tok, data, window, dtype="bfloat16", max_windows=2)
    assert math.isfinite(bf16["ppl"])


def test_ppl_bad_inputs(tmp_path):
    model, tok = make_tiny_llama(), make_tokenizer()
    with pytest.raises(FlexiError, match="wikitext2/test.jsonl"):
        perplexity.wikitext2_token_ppl(model, tok, tmp_path, 32)
    data = write_fake_wikitext2(tmp_path, n_rows=2)
    with pytest.raises(FlexiError) as e:
        perplexity.wikitext2_token_ppl(model, tok, data, 1)
    assert e.value.param == "evaluate.ppl_window"
    with pytest.raises(FlexiError, match="128 positions"):
        perplexity.wikitext2_token_ppl(model, tok, data, 256)
    with pytest.raises(FlexiError, match="less than one"):
        perplexity.wikitext2_token_ppl(model, tok, data, 100)


def test_heldout_ppl(tokens):
    model = make_tiny_llama()
    r = perplexity.heldout_ppl(model, tokens, dtype="float32", label="wikitext2 heldout")
    with torch.no_grad():
        ref = model(input_ids=tokens, labels=tokens).loss.item()
    assert r["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert r["protocol"].startswith("wikitext2 heldout: 4 pre-tokenised sequences of 16 tokens")


# -- end to end through lm-eval ----------------------------------------------------------------------------

def test_run_zero_shot_tiny_flexi_model(tmp_path):
    """A FlexiGPT variant (PEFT LoRA injected, output-norm hooks) goes through HFLM unchanged."""
    data = write_fake_data(tmp_path / "data", tasks=("arc_easy", "piqa"), n=5)
    dense = make_tiny_llama()
    model = fm.build(copy.deepcopy(dense), fm.prune_spec(6, {2: 1}, fm.LoraSettings(rank=4)))
    calls = []
    model.model.layers[2].flexi_attn_out_norm.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    stored = fm.unique_params(model)
    tok = make_tokenizer()
    r = lm_tasks.run_zero_shot(model, tok, ["arc_easy", "piqa"], data, limit=5, batch_size=4,
                               dtype="bfloat16", yaml_dir=tmp_path / "yaml", bootstrap_iters=0)
    assert calls, "the FlexiGPT output-norm hook did not run inside lm-eval"
    assert model.training and tok.pad_token is None  # caller's state is left alone
    assert fm.unique_params(model) == stored  # HFLM's tie_weights() did not undo the weight sharing
    assert set(r["tasks"]) == {"arc_easy", "piqa"} and r["n_docs"] == {"arc_easy": 5, "piqa": 5}
    for m in r["tasks"].values():
        assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["acc_norm"] <= 1.0
    json.dumps(r, allow_nan=False)  # the whole result, raw lm-eval output included, is plain JSON
    assert r["raw"]["results"]["piqa_local"]["acc,none"] == r["tasks"]["piqa"]["acc"]
    assert (tmp_path / "yaml" / "piqa_local.yaml").is_file()


# -- cost ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt])
def test_cost_dense_flexi_shortgpt(make):
    dense = make()
    L = dense.config.num_hidden_layers
    cd = cost.count_cost(dense)
    n_all = sum(p.numel() for p in dense.parameters())
    assert cd.stored_params == cd.total_params == n_all and cd.adapter_params == 0 and cd.block_executions == L
    head = dense.lm_head.weight.numel()  # tied: counted as a matmul, while the lookups are not
    assert cd.flops_per_token == 2 * (n_all - cd.embedding_params + head)
    flexi = fm.build(copy.deepcopy(dense), fm.prune_spec(L, {2: 1}, fm.LoraSettings(rank=4)))
    cf = cost.count_cost(flexi)
    shared = sum(w.numel() for w in arch_of(flexi).weights(1).values())
    shared += sum(m.bias.numel() for m in arch_of(flexi).linears(1).values()
                  if getattr(getattr(m, "base_layer", m), "bias", None) is not None)
    assert cf.total_params - cf.stored_params == shared
    assert cf.adapter_params > 0 and cf.total_params == cd.total_params + cf.adapter_params
    assert cf.flops_per_token == cd.flops_per_token + 2 * cf.adapter_params and cf.block_executions == L
    short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(L, [2]))
    cs = cost.count_cost(short)
    assert cs.block_executions == L - 1 and cs.stored_params == cs.total_params < cd.total_params
    ctx = cost.count_cost(dense, context=10)
    assert ctx.flops_per_token - cd.flops_per_token == 4 * dense.config.hidden_size * 10 * L


def test_forward_latency(tokens):
    r = cost.forward_latency(make_tiny_llama(), tokens[:2, :8], repeats=2, dtype="float32", warmup=0)
    assert r["median_s"] > 0 and r["repeats"] == 2 and r["tokens"] == 16
    with pytest.raises(FlexiError, match="cost.repeats"):
        cost.forward_latency(make_tiny_llama(), tokens, repeats=0)
    with pytest.raises(FlexiError, match="cost.batch"):
        cost.forward_latency(make_tiny_llama(), tokens.float())


def test_wikitext2_windows_start_with_bos_where_the_tokenizer_adds_it(tmp_path):
    data = write_fake_wikitext2(tmp_path)
    model, (tok, bos) = make_tiny_llama(), bos_tokenizer()
    text = "\n\n".join(json.loads(line)["text"] for line in (data / perplexity.WIKITEXT2_FILE).read_text().splitlines())
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    window = 30
    n = ids.numel() // (window - 1)  # each window holds BOS + 29 text tokens
    r = perplexity.wikitext2_token_ppl(model, tok, data, window, batch_size=2, dtype="float32")
    assert (r["windows"], r["predicted_tokens"]) == (n, n * (window - 1))  # every text token is predicted
    assert f"BOS [{bos}] + 29 text tokens" in r["protocol"]
    windows = torch.cat([torch.full((n, 1), bos), ids[: n * 29].view(n, 29)], dim=1)
    with torch.no_grad():  # HF's own shifted loss over BOS-led windows
        ref = model(input_ids=windows, labels=windows).loss
    assert r["ppl"] == pytest.approx(math.exp(ref.item()), rel=1e-5)
