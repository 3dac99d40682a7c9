"""The train split is streamed to disk as it is packed and read lazily by training.

Each check compares against the old in-memory path (a verbatim copy of the former ``build_splits``
below, and ``save_file`` of its tensor): same bytes, same rows, same digest, same loss curve.
"""
import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import DATA_DIR, make_tiny_llama
from flexigpt.data import packing
from flexigpt.data.packing import SplitSpec, build_splits, doc_key, pack
from flexigpt.data.splits import (CalibrationSettings, HeldoutSettings, RowWriter, SplitRows, load_split, open_split,
                                  prepare, safetensors_header)
from flexigpt.errors import FlexiError
from flexigpt.fileio import sha256_file
from flexigpt.model import flexi as fm
from flexigpt.train import TrainSettings, inputs_digest, train
from helpers import corpus, make_tokenizer, write_jsonl
from train_worker import data


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# -- the old in-memory packing, kept verbatim as the reference ----------------------------------------

def _old_take(docs, tokens_needed, sep_len):
    total = 0
    for i, d in enumerate(docs):
        total += len(d) + sep_len
        if total >= tokens_needed:
            return i + 1
    return len(docs) + 1


def old_build_splits(pool_docs, heldout_docs, tokenizer, spec):
    """``build_splits`` before streaming: the whole pool tokenized at once, every split in memory."""
    sep = [tokenizer.eos_token_id]
    rng = random.Random(spec.seed)
    seen, order = set(), []
    for i, d in enumerate(pool_docs):
        if (k := doc_key(d)) not in seen:
            seen.add(k)
            order.append(i)
    rng.shuffle(order)
    stats = {"pool_duplicate_docs_dropped": len(pool_docs) - len(order)}
    if heldout_docs is None:
        toks_all = tokenizer([pool_docs[i] for i in order], add_special_tokens=False)["input_ids"]
        need = (spec.n_heldout or 0) * spec.seq_len
        k = _old_take(toks_all, need, 1) if need else 0
        held_idx, order, toks = order[:k], order[k:], toks_all[k:]
        heldout_docs = [pool_docs[i] for i in held_idx]
        stats["heldout_from_pool_docs"] = k
    else:
        held_keys = {doc_key(d) for d in heldout_docs}
        before = len(order)
        order = [i for i in order if doc_key(pool_docs[i]) not in held_keys]
        stats["pool_docs_dropped_overlapping_heldout"] = before - len(order)
        toks = tokenizer([pool_docs[i] for i in order], add_special_tokens=False)["input_ids"]
    available = sum(len(t) + 1 for t in toks)
    k_cal = _old_take(toks, spec.n_calibration * spec.seq_len, 1)
    assert k_cal <= len(toks)
    rest = toks[k_cal:]
    k_train = _old_take(rest, (spec.train_tokens // spec.seq_len) * spec.seq_len, 1)
    assert k_train <= len(rest)
    cal = pack(toks[:k_cal], spec.seq_len, sep)[: spec.n_calibration]
    train_t = pack(rest[:k_train], spec.seq_len, sep)[: spec.train_tokens // spec.seq_len]
    held_ids = tokenizer(spec.heldout_join.join(heldout_docs), add_special_tokens=False)["input_ids"]
    n_win = len(held_ids) // spec.seq_len
    n_h = n_win if spec.n_heldout is None else spec.n_heldout
    heldout = torch.tensor(held_ids[: n_h * spec.seq_len], dtype=torch.int32).view(n_h, spec.seq_len)
    stats.update(pool_tokens_available=available, calibration_docs=k_cal, train_docs=k_train,
                 heldout_docs=len(heldout_docs), heldout_windows_available=n_win,
                 calibration_doc_keys=[doc_key(pool_docs[i]) for i in order[:k_cal]],
                 train_doc_keys=[doc_key(pool_docs[i]) for i in order[k_cal:k_cal + k_train]])
    return {"calibration": cal, "train": train_t, "heldout": heldout}, stats


def saved_bytes(t: torch.Tensor, tmp: Path) -> bytes:
    f = tmp / "ref.safetensors"
    save_file({"input_ids": t.contiguous()}, str(f), metadata={"seq_len": str(t.shape[1])})
    return f.read_bytes()


def small_chunks(monkeypatch, docs: int = 8, tokens: int = 64) -> None:
    """Tokenize ``docs`` documents per call and flush every ``tokens`` tokens: many chunks on small data."""
    monkeypatch.setattr(packing, "CHUNK_DOCS", docs)
    monkeypatch.setattr(packing, "FLUSH_TOKENS", tokens)


def prepare_tiny(tmp: Path, tok, pool, held, *, seq_len=16, n_cal=8, train_tokens=160, n_held=4, seed=0):
    """``prepare`` on jsonl files written under ``tmp/data`` (``held=None``: heldout from the pool)."""
    write_jsonl(tmp / "data" / "pool.jsonl", pool)
    if held is not None:
        write_jsonl(tmp / "data" / "held.jsonl", held)
    cal = CalibrationSettings(source="pool.jsonl", seq_len=seq_len, n_sequences=n_cal, train_tokens=train_tokens)
    hs = HeldoutSettings(source="held.jsonl" if held is not None else "pool.jsonl", n_sequences=n_held)
    return prepare(cal, hs, seed, tmp / "data", tok, None, tmp / "out")


# -- writing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (7, 3), (10, 16), (33, 512)])
def test_streamed_header_and_rows_equal_save_file_bytes(tmp_path, shape):
    t = torch.randint(0, 50_000, shape, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    with RowWriter(tmp_path / "s.safetensors", *shape) as w:
        for a in range(0, shape[0], 2):  # uneven blocks, as the packer hands them over
            w.write(t[a:a + 2].numpy())
    assert (tmp_path / "s.safetensors").read_bytes() == saved_bytes(t, tmp_path)
    assert saved_bytes(t, tmp_path).startswith(safetensors_header(shape, {"seq_len": str(shape[1])}))


def test_row_writer_refuses_too_many_and_too_few_rows(tmp_path):
    with pytest.raises(ValueError):
        with RowWriter(tmp_path / "a.safetensors", 2, 4) as w:
            w.write(np.zeros((3, 4), np.int32))
    with pytest.raises(RuntimeError, match="1 of 2 rows"):
        with RowWriter(tmp_path / "b.safetensors", 2, 4) as w:
            w.write(np.zeros((1, 4), np.int32))


@pytest.mark.parametrize("carve", [False, True])
@pytest.mark.parametrize("train_tokens", [16, 160, 16 * 150 + 7])
def test_streamed_prepare_equals_old_in_memory_packing(tmp_path, tok, monkeypatch, carve, train_tokens):
    small_chunks(monkeypatch)
    pool = corpus(200)
    pool = pool + pool[:15]  # duplicates are dropped before packing
    held = None if carve else corpus(30, seed=1) + pool[:5]  # overlap leaves the pool
    m = prepare_tiny(tmp_path, tok, pool, held, train_tokens=train_tokens)
    spec = SplitSpec(seq_len=16, n_calibration=8, train_tokens=train_tokens, n_heldout=4, seed=0)
    ref, ref_stats = old_build_splits(pool, held, tok, spec)
    out = tmp_path / "out"
    for k in ("calibration", "train", "heldout"):
        assert (out / f"{k}.safetensors").read_bytes() == saved_bytes(ref[k], tmp_path), k
        assert m["splits"][k]["sequences"] == ref[k].shape[0] and m["splits"][k]["tokens"] == ref[k].numel()
    keys = json.loads((out / "doc_keys.json").read_text())
    assert keys == {"calibration": ref_stats.pop("calibration_doc_keys"), "train": ref_stats.pop("train_doc_keys")}
    assert list(m["stats"].items()) == list(ref_stats.items())  # same values, same order (manifest bytes)
    assert ref["train"].shape[0] == train_tokens // 16
    # the in-memory form of the new packer agrees too
    mem, _ = build_splits(pool, held, tok, spec)
    assert all(torch.equal(mem[k], ref[k]) for k in ref)


def test_streamed_prepare_on_the_default_data_equals_old_packing(tmp_path, tok, monkeypatch):
    """The small default data at the default sizes (seq_len 512, 64 calibration rows, 262144 train tokens)."""
    if not (DATA_DIR / "calibration" / "calib_text.jsonl").is_file():
        pytest.fail(f"offline data not found at {DATA_DIR}; set FLEXIGPT_TEST_DATA_DIR")
    monkeypatch.setattr(packing, "CHUNK_DOCS", 1000)  # several chunks over its ~7.7k documents
    from flexigpt.data.text import read_source

    cal, held = CalibrationSettings(), HeldoutSettings()
    m = prepare(cal, held, 0, DATA_DIR, tok, None, tmp_path / "out")
    spec = SplitSpec(seq_len=cal.seq_len, n_calibration=cal.n_sequences, train_tokens=cal.train_tokens,
                     n_heldout=held.n_sequences, seed=0)
    pool = read_source(cal.source, DATA_DIR).docs
    ref, ref_stats = old_build_splits(pool, read_source(held.source, DATA_DIR).docs, tok, spec)
    for k in ("calibration", "train", "heldout"):
        assert sha256_file(tmp_path / "out" / f"{k}.safetensors") == \
            hashlib.sha256(saved_bytes(ref[k], tmp_path)).hexdigest() == m["splits"][k]["sha256"], k
    assert m["splits"]["train"]["tokens"] == 262144 and m["stats"]["train_docs"] == ref_stats["train_docs"]
    assert m["stats"]["pool_tokens_available"] == ref_stats["pool_tokens_available"]


# -- memory: what packing holds does not grow with the split ------------------------------------------

class SpyTokenizer:
    """The test tokenizer, recording the largest batch of documents it was handed."""

    def __init__(self, tok):
        self.tok, self.max_batch = tok, 0
        self.eos_token_id, self.name_or_path = tok.eos_token_id, "spy"

    def __call__(self, texts, **kw):
        if isinstance(texts, list):
            self.max_batch = max(self.max_batch, len(texts))
        return self.tok(texts, **kw)


@pytest.mark.parametrize("n_docs", [300, 1200])
def test_packing_holds_one_chunk_not_the_split(tok, monkeypatch, n_docs):
    small_chunks(monkeypatch, docs=8, tokens=64)
    spy, writes = SpyTokenizer(tok), []
    pool = corpus(n_docs)
    seq_len = 16
    train_tokens = (n_docs * 30 // seq_len) * seq_len  # most of the text: grows with n_docs
    spec = SplitSpec(seq_len=seq_len, n_calibration=4, train_tokens=train_tokens, n_heldout=2, seed=0)
    splits, stats = build_splits(pool, corpus(20, seed=3), spy, spec, train_sink=writes.append)
    assert "train" not in splits
    longest_doc = max(len(t) for t in tok(pool, add_special_tokens=False)["input_ids"]) + 1
    assert spy.max_batch == 8  # tokenized 8 documents at a time, never the pool
    assert max(len(w) for w in writes) <= (64 + longest_doc) // seq_len  # rows handed over per flush
    rows = np.concatenate(writes)
    assert rows.shape == (train_tokens // seq_len, seq_len) and len(writes) > 20
    ref, _ = old_build_splits(pool, corpus(20, seed=3), tok, spec)
    assert np.array_equal(rows, ref["train"].numpy())


def test_too_little_text_keeps_its_errors(tmp_path, tok, monkeypatch):
    small_chunks(monkeypatch)
    with pytest.raises(FlexiError) as e:
        prepare_tiny(tmp_path, tok, corpus(20), corpus(10, seed=1), train_tokens=10**6)
    assert e.value.param == "calibration.train_tokens" and "holds only" in e.value.problem
    toks = tok(corpus(20), add_special_tokens=False)["input_ids"]
    total = sum(len(t) + 1 for t in toks)
    assert f"({total} in all, 20 documents)" in e.value.problem  # counted over every document, as before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # no half-written folder
    with pytest.raises(FlexiError) as e:
        build_splits(corpus(3), corpus(10, seed=1), tok, SplitSpec(16, 1000, 160, 4, 0))
    assert e.value.param == "calibration.n_sequences" and "the text has only" in e.value.problem
    with pytest.raises(FlexiError) as e:  # heldout carved from a pool too small for it: calibration finds nothing
        build_splits(corpus(3), None, tok, SplitSpec(16, 1, 16, 1000, 0))
    assert e.value.param == "calibration.n_sequences" and "has only 0" in e.value.problem


# -- reading ------------------------------------------------------------------------------------------

def write_split(folder: Path, t: torch.Tensor, name: str = "train", manifest: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with RowWriter(folder / f"{name}.safetensors", *t.shape) as w:
        w.write(t.numpy())
    if manifest:
        (folder / "manifest.json").write_text(json.dumps(
            {"splits": {name: {"sha256": sha256_file(folder / f"{name}.safetensors")}}}))
    return folder / f"{name}.safetensors"


class CountingRows(SplitRows):
    """A lazy split that records how many rows each read returned."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.reads: list[int] = []

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        self.reads.append(out.shape[0] if out.dim() == 2 else 1)
        return out


def test_lazy_rows_equal_the_tensor_rows(tmp_path):
    t = torch.randint(0, 32_000, (37, 9), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    write_split(tmp_path, t)
    rows, full = open_split(tmp_path, "train"), load_split(tmp_path, "train")
    assert rows.shape == full.shape == (37, 9) and len(rows) == 37
    idx = torch.tensor([36, 0, 5, 5, 17])  # any order, repeats
    for got, want in ((rows[idx], full[idx]), (rows[3:11], full[3:11]), (rows[4], full[4]), (rows[idx.numpy()], full[idx])):
        assert got.dtype == torch.int64 and torch.equal(got, want)


def test_inputs_digest_of_lazy_rows_equals_the_whole_tensor_digest(tmp_path, monkeypatch):
    from flexigpt import train as train_mod

    t = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(3))
    write_split(tmp_path, t.to(torch.int32))
    model = make_tiny_llama()
    ids = load_split(tmp_path, "train")
    old = hashlib.sha256(ids.detach().contiguous().cpu().numpy().tobytes())  # the digest before blocks
    for name, p in model.named_parameters():
        v = p.detach().reshape(-1)
        if not p.requires_grad and v.numel() > 4096:
            v = v[torch.arange(4096) * (v.numel() - 1) // 4095]
        old.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        old.update(v.float().numpy().tobytes())
    monkeypatch.setattr(train_mod, "DIGEST_BLOCK_TOKENS", 5 * 32)  # 5 rows per block: 13 blocks, the last short
    rows = CountingRows(tmp_path / "train.safetensors")
    assert inputs_digest(model, rows) == inputs_digest(model, ids) == old.hexdigest()
    assert max(rows.reads) == 5 and sum(rows.reads) == 64
    assert inputs_digest(model, t) == old.hexdigest()  # an in-memory int64 tensor as before


def flexi():
    return fm.build(make_tiny_llama(), fm.prune_spec(6, {2: 1, 4: 5}, fm.LoraSettings(rank=4), gamma_init=0.05))


def settings(**kw):
    base = dict(lr=1e-2, batch_size=8, micro_batch=2, token_budget=8 * 32 * 6, warmup_steps=1, dtype="float32",
                checkpoint_every=0)
    return TrainSettings(**{**base, **kw})


def test_training_on_lazy_rows_matches_the_tensor_and_reads_one_micro_batch(tmp_path, monkeypatch, one_thread):
    from flexigpt import train as train_mod

    monkeypatch.setattr(train_mod, "DIGEST_BLOCK_TOKENS", 2 * 32)
    ids = data()  # 64 x 32, int64 values < 128
    write_split(tmp_path, ids.to(torch.int32))
    rows = CountingRows(tmp_path / "train.safetensors")
    a = train(flexi(), ids, settings())
    b = train(flexi(), rows, settings())
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["grad_norm"] for h in a.history] == [h["grad_norm"] for h in b.history]
    assert max(rows.reads) == 2  # a micro-batch (or a digest block) at a time, never the 64-row split
    assert sum(rows.reads) == 64 + 6 * 8  # the digest once, then 6 steps of 8 rows


def test_budget_beyond_the_split_warns_once(caplog, one_thread):
    with caplog.at_level(logging.WARNING, logger="flexigpt.train"):
        train(flexi(), data(), settings(token_budget=8 * 32 * 12))  # 12 steps, 8 per pass over 64 rows
    warned = [r.getMessage() for r in caplog.records if "passes over the train split" in r.getMessage()]
    assert len(warned) == 1 and "1.50 passes" in warned[0] and "calibration.train_tokens" in warned[0]
    assert f"at least {12 * 8 * 32}" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flexigpt.train"):
        train(flexi(), data(), settings(token_budget=8 * 32 * 8))  # exactly one pass
    assert not [r for r in caplog.records if "passes over the train split" in r.getMessage()]


# -- a damaged train file is a clean error ------------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[:-10])
    elif how == "flip":
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0xFF]) + raw[-4:])
    elif how == "header":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif how == "short":
        path.write_bytes(raw[:5])
    elif how == "float":
        save_file({"input_ids": torch.zeros(4, 8)}, str(path), metadata={"seq_len": "8"})


@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.parametrize("how,says", [("truncate", "truncated"), ("flip", None), ("header", "header is not JSON"),
                                      ("short", "shorter than"), ("float", "no integer 'input_ids'")])
def test_a_corrupt_or_truncated_train_file_is_a_clean_error(tmp_path, manifest, how, says):
    f = write_split(tmp_path, torch.arange(64, dtype=torch.int32).view(8, 8), manifest=manifest)
    _damage(f, how)
    if how == "flip" and not manifest:
        assert open_split(tmp_path, "train").shape == (8, 8)  # only the manifest sha256 can notice
        return
    with pytest.raises(FlexiError) as e:
        open_split(tmp_path, "train")
    assert e.value.param == "paths.data" and str(f) in e.value.problem and "prepare_calibration" in e.value.fix
    assert ("sha256" if manifest else says) in e.value.problem


def test_a_missing_train_file_names_paths_data(tmp_path):
    with pytest.raises(FlexiError) as e:
        open_split(tmp_path, "train")
    assert e.value.param == "paths.data" and "no train split" in e.value.problem
