import pytest
import torch

from flexigpt.errors import FlexiError
from flexigpt.data.packing import SplitSpec, build_splits, doc_key, pack
from conftest import bos_tokenizer
from helpers import corpus, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def spec(**kw):
    base = dict(seq_len=16, n_calibration=8, train_tokens=160, n_heldout=4, seed=0)
    return SplitSpec(**{**base, **kw})


def test_pack_drops_partial_tail():
    out = pack([[1, 2, 3], [4, 5]], seq_len=3, sep=[0])
    assert out.tolist() == [[1, 2, 3], [0, 4, 5]]


def test_packing_is_deterministic_and_seeded(tok):
    docs, held = corpus(80), corpus(30, seed=1)
    a, _ = build_splits(docs, held, tok, spec())
    b, _ = build_splits(docs, held, tok, spec())
    c, _ = build_splits(docs, held, tok, spec(seed=1))
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["train"], c["train"])
    assert a["calibration"].shape == (8, 16) and a["train"].shape == (10, 16) and a["heldout"].shape == (4, 16)


def test_splits_are_disjoint_by_document(tok):
    docs = corpus(80)
    held = corpus(30, seed=1) + docs[:5]  # overlapping documents must leave the pool
    _, st = build_splits(docs, held, tok, spec())
    cal, train = set(st["calibration_doc_keys"]), set(st["train_doc_keys"])
    held_keys = {doc_key(d) for d in held}
    assert cal and train and not (cal & train) and not (cal & held_keys) and not (train & held_keys)
    assert st["pool_docs_dropped_overlapping_heldout"] == 5


def test_heldout_carved_from_pool_is_disjoint(tok):
    docs = corpus(80)
    splits, st = build_splits(docs, None, tok, spec())
    assert st["heldout_from_pool_docs"] > 0 and splits["heldout"].shape[0] == 4


def test_budget_larger_than_text_says_how_much(tok):
    with pytest.raises(FlexiError) as e:
        build_splits(corpus(20), corpus(10, seed=1), tok, spec(train_tokens=10**6))
    assert e.value.param == "calibration.train_tokens" and "holds only" in e.value.problem


def test_too_many_heldout_windows(tok):
    with pytest.raises(FlexiError) as e:
        build_splits(corpus(80), corpus(3, seed=1), tok, spec(n_heldout=1000))
    assert e.value.param == "heldout.n_sequences"


def test_bos_prefix_follows_the_tokenizer(tok):
    from flexigpt.data.packing import bos_prefix

    assert bos_prefix(tok) == []  # adds nothing, like SmolLM2's and GPT-2's tokenizers
    btok, bos = bos_tokenizer()
    assert bos_prefix(btok) == [bos]


def test_rows_start_with_bos_where_the_tokenizer_adds_it(tok):
    from flexigpt.data.packing import bos_prefix

    btok, bos = bos_tokenizer()
    docs, held = corpus(80), corpus(30, seed=1)
    plain, _ = build_splits(docs, held, tok, spec())
    with_bos, st = build_splits(docs, held, btok, spec())
    assert st["row_prefix_ids"] == [bos] and bos_prefix(tok) == []
    for k in plain:
        rows = with_bos[k]
        assert rows.shape == plain[k].shape  # seq_len counts the BOS
        assert (rows[:, 0] == bos).all() and not (rows[:, 1:] == bos).any()
        assert not (plain[k] == bos).any()
    # the text after BOS is the same token stream, cut one token shorter per row
    assert torch.equal(with_bos["heldout"][0, 1:], plain["heldout"].flatten()[:15])


def test_pack_with_prefix():
    out = pack([[1, 2, 3], [4, 5]], seq_len=3, sep=[0], prefix=[9])
    assert out.tolist() == [[9, 1, 2], [9, 3, 0], [9, 4, 5]]
