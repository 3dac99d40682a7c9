"""Tokenize documents and pack them deterministically into fixed-length sequences.

Splits:
- ``calibration``: ``n_calibration`` sequences for importance scoring;
- ``train``: ``train_tokens`` tokens (rounded down to whole sequences) for adapter training;
- ``heldout``: perplexity windows, disjoint from the other two by document.

Within calibration/train, documents are shuffled with ``seed`` and joined with EOS; a document
never spans two splits. Every row starts with the tokens the tokenizer puts before a text
(:func:`bos_prefix`: BOS for Llama-2/Gemma tokenizers, nothing for SmolLM2/GPT-2), as lm-eval does. The heldout split keeps source order and joins with ``heldout_join``
("\\n\\n" is the usual WikiText-2 protocol).

Documents are tokenized :data:`CHUNK_DOCS` at a time and the train split can be streamed to a sink
(:func:`build_splits` ``train_sink``), so a split of billions of tokens never sits in memory; the
document texts themselves do.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flexigpt.errors import FlexiError

CHUNK_DOCS = 4096  # documents tokenized per call: bounds the tokens held at once, whatever the split size
FLUSH_TOKENS = 1 << 20  # train tokens buffered before their full rows go to the sink (4 MiB as int32)

RowSink = Callable[[np.ndarray], None]
"""Receives the train split in order, as int32 ``[k, seq_len]`` blocks of rows."""


def doc_key(text: str) -> str:
    """Whitespace-normalised hash used to prove document disjointness."""
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (``[bos]`` or ``[]``).

    Why: lm-eval encodes with the tokenizer's own special tokens, so packing and perplexity follow the
    same convention (Gemma reads WikiText at PPL 23.9 with BOS and 61.5 without).
    """
    probe = "The"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):  # where the plain ids start inside the special-token encoding
        if full[k:k + len(plain)] == plain:
            return [int(i) for i in full[:k]]
    return []


def with_prefix(rows: np.ndarray | torch.Tensor, prefix: list[int]) -> np.ndarray | torch.Tensor:
    """``rows`` [N, T'] with ``prefix`` prepended to every row (a no-op for an empty prefix)."""
    if not prefix:
        return rows
    if isinstance(rows, torch.Tensor):
        head = torch.tensor(prefix, dtype=rows.dtype).expand(rows.shape[0], len(prefix))
        return torch.cat([head, rows], dim=1)
    return np.concatenate([np.broadcast_to(np.asarray(prefix, dtype=rows.dtype), (rows.shape[0], len(prefix))), rows],
                          axis=1)


def pack(token_docs: list[list[int]], seq_len: int, sep: list[int], prefix: list[int] | None = None) -> torch.Tensor:
    """Concatenate docs (each followed by ``sep``) into full rows of ``prefix`` + text, ``seq_len`` in all; drop the tail."""
    prefix = prefix or []
    body = seq_len - len(prefix)
    flat: list[int] = []
    for t in token_docs:
        flat += t + sep
    n = len(flat) // body
    return with_prefix(torch.tensor(flat[: n * body], dtype=torch.int32).view(n, body), prefix)


@dataclass
class SplitSpec:
    seq_len: int
    n_calibration: int
    train_tokens: int
    n_heldout: int | None  # None = every full window
    seed: int
    heldout_join: str = "\n\n"


def _doc_tokens(tokenizer, docs: list[str], idx: list[int]) -> Iterator[list[int]]:
    """Token ids of ``docs[i]`` for each ``i`` in ``idx``, tokenized :data:`CHUNK_DOCS` documents per call."""
    for a in range(0, len(idx), CHUNK_DOCS):  # each text is tokenized alone, so chunking changes no id
        yield from tokenizer([docs[i] for i in idx[a:a + CHUNK_DOCS]], add_special_tokens=False)["input_ids"]


def _take(docs: Iterator[list[int]], tokens_needed: int, keep: Callable[[list[int]], None] | None = None
          ) -> tuple[int, int, bool]:
    """Consume leading docs until their packed length (each + 1 separator) reaches ``tokens_needed``.

    Returns (docs consumed, their packed length, whether it was reached); each doc is passed to ``keep``.
    """
    n = total = 0
    for d in docs:
        n, total = n + 1, total + len(d) + 1
        if keep is not None:
            keep(d)
        if total >= tokens_needed:
            return n, total, True
    return n, total, False


class _RowPacker:
    """Docs (each + ``sep``) -> the first ``n_rows`` full ``seq_len`` rows, handed to ``sink`` in blocks.

    Holds at most :data:`FLUSH_TOKENS` tokens plus one document: memory does not grow with the split.
    """

    def __init__(self, seq_len: int, n_rows: int, sep: list[int], sink: RowSink, prefix: list[int] | None = None
                 ) -> None:
        self.prefix = prefix or []
        self.body = seq_len - len(self.prefix)  # text tokens per row, after the prefix
        self.left, self.sep, self.sink = n_rows, sep, sink
        self.buf: list[int] = []

    def add(self, doc: list[int]) -> None:
        self.buf += doc
        self.buf += self.sep
        if len(self.buf) >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        k = min(len(self.buf) // self.body, self.left)
        if k:
            rows = np.asarray(self.buf[:k * self.body], dtype=np.int32).reshape(k, self.body)
            self.sink(np.ascontiguousarray(with_prefix(rows, self.prefix)))
            self.left -= k
        self.buf = self.buf[k * self.body:] if self.left else []  # the tail starts the next row, if any is due


def build_splits(pool_docs: list[str], heldout_docs: list[str] | None, tokenizer, spec: SplitSpec,
                 train_sink: RowSink | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ({split: int32 [N, seq_len]}, stats). ``heldout_docs=None`` carves heldout from the pool.

    With ``train_sink``, the train split (``train_tokens // seq_len`` rows) goes to it block by block as it
    is packed and is left out of the dict; without, it is returned in memory. Either way the pool is
    tokenized :data:`CHUNK_DOCS` documents at a time: after the train split is full, the rest is only counted.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FlexiError("model", "the tokenizer has no EOS token to separate documents", "use a tokenizer with eos_token")
    sep, prefix = [eos], bos_prefix(tokenizer)
    body = spec.seq_len - len(prefix)  # text tokens per row
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
        toks = _doc_tokens(tokenizer, pool_docs, order)
        need = (spec.n_heldout or 0) * body
        k = _take(toks, need)[0] if need else 0  # too little text: all of it, and the calibration check fails
        held_idx, order = order[:k], order[k:]
        heldout_docs = [pool_docs[i] for i in held_idx]
        stats["heldout_from_pool_docs"] = k
    else:
        held_keys = {doc_key(d) for d in heldout_docs}
        before = len(order)
        order = [i for i in order if doc_key(pool_docs[i]) not in held_keys]
        stats["pool_docs_dropped_overlapping_heldout"] = before - len(order)
        toks = _doc_tokens(tokenizer, pool_docs, order)

    cal_need = spec.n_calibration * body
    cal_toks: list[list[int]] = []
    k_cal, cal_len, ok = _take(toks, cal_need, cal_toks.append)
    if not ok:  # every document went into the attempt, so cal_len is all the text there is
        raise FlexiError("calibration.n_sequences", f"needs {cal_need} tokens but the text has only {cal_len}",
                         f"lower it to at most {cal_len // body}, or add text")
    n_train = spec.train_tokens // spec.seq_len
    blocks: list[np.ndarray] = []
    packer = _RowPacker(spec.seq_len, n_train, sep, train_sink or blocks.append, prefix)
    k_train, train_len, ok = _take(toks, n_train * body, packer.add)
    rest_avail = train_len + sum(len(t) + 1 for t in toks)  # counted chunk by chunk, tokens not kept
    available = cal_len + rest_avail
    if not ok:
        raise FlexiError("calibration.train_tokens",
                         f"{spec.train_tokens} tokens requested, but after the calibration split the text holds only "
                         f"{rest_avail} tokens ({available} in all, {len(pool_docs)} documents)",
                         f"lower it to at most {rest_avail - spec.seq_len}, or add text")
    packer.flush()
    cal = pack(cal_toks, spec.seq_len, sep, prefix)[: spec.n_calibration]
    del cal_toks

    held_text = spec.heldout_join.join(heldout_docs)
    held_ids = tokenizer(held_text, add_special_tokens=False)["input_ids"]
    n_win = len(held_ids) // body
    if n_win == 0:
        raise FlexiError("heldout.source", f"holds {len(held_ids)} tokens, less than one window of {spec.seq_len}",
                         "use a larger heldout source or a shorter calibration.seq_len")
    if spec.n_heldout is not None and spec.n_heldout > n_win:
        raise FlexiError("heldout.n_sequences", f"asks for {spec.n_heldout} windows, the text has {n_win}",
                         f"lower it to at most {n_win} (or null for all)")
    n_h = n_win if spec.n_heldout is None else spec.n_heldout
    heldout = with_prefix(torch.tensor(held_ids[: n_h * body], dtype=torch.int32).view(n_h, body), prefix)
    stats.update(row_prefix_ids=prefix, pool_tokens_available=available, calibration_docs=k_cal, train_docs=k_train,
                 heldout_docs=len(heldout_docs), heldout_windows_available=n_win,
                 calibration_doc_keys=[doc_key(pool_docs[i]) for i in order[:k_cal]],
                 train_doc_keys=[doc_key(pool_docs[i]) for i in order[k_cal:k_cal + k_train]])
    if train_sink is not None:
        return {"calibration": cal, "heldout": heldout}, stats
    train = torch.from_numpy(np.concatenate(blocks)) if blocks else torch.zeros((0, spec.seq_len), dtype=torch.int32)
    return {"calibration": cal, "train": train, "heldout": heldout}, stats
