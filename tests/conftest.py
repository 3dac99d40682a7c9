"""Shared fixtures: tiny random models built from configs (no downloads)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))  # tests that load a stage script find its sibling _env.py
DATA_DIR = Path(os.environ.get("FLEXIGPT_TEST_DATA_DIR", ROOT.parent / "shared" / "data"))  # where the tests find it


def make_tiny_llama(n_layers: int = 6, hidden: int = 32, seed: int = 0, vocab: int = 128, kv_heads: int = 2,
                    intermediate: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden + 8,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-6)
    m = LlamaForCausalLM(cfg).eval()
    # random (non-unit) norm weights, so tests catch norms that are dropped or shared wrongly
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def make_tiny_opt(n_layers: int = 4, hidden: int = 32, seed: int = 0, vocab: int = 128):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=n_layers,
                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=hidden)
    return OPTForCausalLM(cfg).eval()


def bos_tokenizer():
    """Like make_tokenizer, but it puts <bos> before every text it encodes with special tokens (Gemma, Llama-2)."""
    from tokenizers import processors

    from helpers import make_tokenizer

    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.convert_tokens_to_ids("<bos>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok, bos


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()


@pytest.fixture(params=["llama", "opt"])
def tiny_model(request):
    return make_tiny_llama() if request.param == "llama" else make_tiny_opt()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (4, 16), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one BLAS thread is fastest and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory):
    """A copy of the project with tiny budgets, after one `make repro` from a shell without the venv.

    Returns ``(path, stages that ran, seconds)``. Shared by the DVC-layer and real-model tests, so
    the embedded model goes through the pipeline once per test session.
    """
    import time

    from helpers import copy_project, run_in

    if not (DATA_DIR / "calibration" / "calib_text.jsonl").is_file():
        pytest.fail(f"offline data not found at {DATA_DIR}; set FLEXIGPT_TEST_DATA_DIR")
    proj = copy_project(DATA_DIR, tmp_path_factory.mktemp("clone"))
    t0 = time.time()
    ran, _ = run_in(proj, ["make", "repro", f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed"], with_venv=False)
    return proj, ran, time.time() - t0
