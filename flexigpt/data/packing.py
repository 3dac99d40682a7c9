"""Tokenize documents and pack them deterministically into fixed-length sequences.

Splits:
- ``calibration``: ``n_calibration`` sequences for importance scoring;
- ``train``: ``train_tokens`` tokens (rounded down to whole sequences) for adapter training;
- ``heldout``: perplexity windows, disjoint from the other two by document.

Within calibration/train, documents are shuffled with ``seed`` and joined with EOS; a document
never spans two splits. The heldout split keeps source order and joins with ``heldout_join``
("\\n\\n" is the usual WikiText-2 protocol).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from flexigpt.errors import FlexiError


def doc_key(text: str) -> str:
    """Whitespace-normalised hash used to prove document disjointness."""
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()


def pack(token_docs: list[list[int]], seq_len: int, sep: list[int]) -> torch.Tensor:
    """Concatenate docs (each followed by ``sep``) and cut into full ``seq_len`` rows; drop the tail."""
    flat: list[int] = []
    for t in token_docs:
        flat += t + sep
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.int32).view(n, seq_len)


@dataclass
class SplitSpec:
    seq_len: int
    n_calibration: int
    train_tokens: int
    n_heldout: int | None  # None = every full window
    seed: int
    heldout_join: str = "\n\n"


def _take(docs: list[list[int]], tokens_needed: int, sep_len: int) -> int:
    """Number of leading docs whose packed length reaches ``tokens_needed``."""
    total = 0
    for i, d in enumerate(docs):
        total += len(d) + sep_len
        if total >= tokens_needed:
            return i + 1
    return len(docs) + 1  # not enough


def build_splits(pool_docs: list[str], heldout_docs: list[str] | None, tokenizer, spec: SplitSpec
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ({split: int32 [N, seq_len]}, stats). ``heldout_docs=None`` carves heldout from the pool."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FlexiError("model", "the tokenizer has no EOS token to separate documents", "use a tokenizer with eos_token")
    sep = [eos]
    rng = random.Random(spec.seed)
    seen: set[str] = set()
    order = []  # each distinct document once: a duplicate could otherwise land in two splits
    for i, d in enumerate(pool_docs):
        if (k := doc_key(d)) not in seen:
            seen.add(k)
            order.append(i)
    rng.shuffle(order)
    stats: dict = {"pool_duplicate_docs_dropped": len(pool_docs) - len(order)}
    if heldout_docs is None:  # carve heldout documents from the shuffled pool first
        toks_all = tokenizer([pool_docs[i] for i in order], add_special_tokens=False)["input_ids"]
        need = (spec.n_heldout or 0) * spec.seq_len
        k = _take(toks_all, need, 1) if need else 0
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
    cal_need = spec.n_calibration * spec.seq_len
    k_cal = _take(toks, cal_need, 1)
    if k_cal > len(toks):
        raise FlexiError("calibration.n_sequences", f"needs {cal_need} tokens but the text has only {available}",
                         f"lower it to at most {available // spec.seq_len}, or add text")
    train_need = (spec.train_tokens // spec.seq_len) * spec.seq_len
    rest = toks[k_cal:]
    rest_avail = sum(len(t) + 1 for t in rest)
    k_train = _take(rest, train_need, 1)
    if k_train > len(rest):
        raise FlexiError("calibration.train_tokens",
                         f"{spec.train_tokens} tokens requested, but after the calibration split the text holds only "
                         f"{rest_avail} tokens ({available} in all, {len(pool_docs)} documents)",
                         f"lower it to at most {rest_avail - spec.seq_len}, or add text")
    cal = pack(toks[:k_cal], spec.seq_len, sep)[: spec.n_calibration]
    train = pack(rest[:k_train], spec.seq_len, sep)[: spec.train_tokens // spec.seq_len]

    held_text = spec.heldout_join.join(heldout_docs)
    held_ids = tokenizer(held_text, add_special_tokens=False)["input_ids"]
    n_win = len(held_ids) // spec.seq_len
    if n_win == 0:
        raise FlexiError("heldout.source", f"holds {len(held_ids)} tokens, less than one window of {spec.seq_len}",
                         "use a larger heldout source or a shorter calibration.seq_len")
    if spec.n_heldout is not None and spec.n_heldout > n_win:
        raise FlexiError("heldout.n_sequences", f"asks for {spec.n_heldout} windows, the text has {n_win}",
                         f"lower it to at most {n_win} (or null for all)")
    n_h = n_win if spec.n_heldout is None else spec.n_heldout
    heldout = torch.tensor(held_ids[: n_h * spec.seq_len], dtype=torch.int32).view(n_h, spec.seq_len)
    stats.update(pool_tokens_available=available, calibration_docs=k_cal, train_docs=k_train,
                 heldout_docs=len(heldout_docs), heldout_windows_available=n_win,
                 calibration_doc_keys=[doc_key(pool_docs[i]) for i in order[:k_cal]],
                 train_doc_keys=[doc_key(pool_docs[i]) for i in order[k_cal:k_cal + k_train]])
    return {"calibration": cal, "train": train, "heldout": heldout}, stats
