"""The supported model families, in one table: tiny random configs for the tests, and README's matrix.

``python tests/families.py --write`` regenerates README.md's "Supported model families" section
(between the ``families:begin`` / ``families:end`` markers); ``tests/test_families.py`` fails when
it is out of date.

Every tiny config is full-rank at LoRA rank = hidden (no GQA, heads x head_dim = hidden, MLPs wider
than hidden), so a full-rank ``svd_diff`` init reproduces the dense model exactly; sliding windows
(4) are shorter than the test sequences (16), so a lost sliding/full pattern changes the logits.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"
HIDDEN, VOCAB, DEPTH, WINDOW = 64, 256, 4, 4
ALT = ["sliding_attention", "full_attention"] * (DEPTH // 2)  # a mixed pattern: every type change is visible

INVARIANTS = (  # what tests/test_families.py checks on every family (layer types: the families that have them)
    "full-rank `svd_diff` init = dense", "γ=0 = ShortGPT", "weight sharing (`data_ptr`)", "compact save/load",
    "HF export loads with `AutoModelForCausalLM`", "extension at γ=0 = base", "one training step",
    "layer types survive pruning/extension", "build-time self-test passes", "streamed = in-memory")
LAYER_TYPES_INVARIANT = 8


def _llama(model_type: str = "llama", **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=DEPTH,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                tie_word_embeddings=False, rms_norm_eps=1e-6)
    return AutoConfig.for_model(model_type, **{**base, **kw})


def _gemma(model_type: str, **kw):
    return _llama(model_type, head_dim=HIDDEN // 4, sliding_window=WINDOW, layer_types=list(ALT),
                  tie_word_embeddings=True, **kw)


def _gemma3_mm():
    from transformers import Gemma3Config

    text = _gemma("gemma3_text").to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                        boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)


def _neox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=DEPTH,
                         num_attention_heads=4, max_position_embeddings=128, use_parallel_residual=True,
                         tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0)


def _opt():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=DEPTH,
                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=HIDDEN, dropout=0.0)


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@dataclass(frozen=True)
class Family:
    name: str                          # shown in README
    model_types: tuple[str, ...]       # config.model_type values (the first is the one tested)
    config: Callable[[], object]       # a tiny random config
    gguf: bool                         # transformers' GGUF loader knows the architecture
    layer_types: bool = False          # per-layer sliding/full attention (tested for surviving depth changes)


FAMILIES: tuple[Family, ...] = (
    Family("Llama (SmolLM)", ("llama",), lambda: _llama(), gguf=True),
    Family("Mistral", ("mistral",), lambda: _llama("mistral", sliding_window=WINDOW), gguf=True),
    Family("Qwen2", ("qwen2",), lambda: _llama("qwen2", use_sliding_window=True, sliding_window=WINDOW,
                                                layer_types=list(ALT)), gguf=True, layer_types=True),
    Family("Qwen3", ("qwen3",), lambda: _llama("qwen3", head_dim=HIDDEN // 4, use_sliding_window=True,
                                                sliding_window=WINDOW, layer_types=list(ALT)),
           gguf=True, layer_types=True),
    Family("Gemma 2", ("gemma2",), lambda: _gemma("gemma2", final_logit_softcapping=5.0, attn_logit_softcapping=20.0),
           gguf=True, layer_types=True),
    Family("Gemma 3 (text)", ("gemma3_text",), lambda: _gemma("gemma3_text", final_logit_softcapping=5.0),
           gguf=True, layer_types=True),
    Family("Gemma 3 (multimodal, text blocks)", ("gemma3",), _gemma3_mm, gguf=False, layer_types=True),
    Family("Phi-3", ("phi3",), lambda: _llama("phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                          resid_pdrop=0.0, embd_pdrop=0.0), gguf=True),
    Family("GPT-NeoX / Pythia", ("gpt_neox",), _neox, gguf=False),
    Family("OPT", ("opt",), _opt, gguf=False),
    Family("GPT-2", ("gpt2",), _gpt2, gguf=True),
)
BY_NAME = {f.model_types[0]: f for f in FAMILIES}


def make_model(family: Family, seed: int = 0):
    """A tiny random float32 model of ``family``, in eval mode, with non-trivial norm weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(family.config(), dtype=torch.float32).eval()
    with torch.no_grad():  # random norm weights catch norms that are dropped or shared wrongly
        for n, p in m.named_parameters():
            if "norm" in n or "ln_" in n:
                p.uniform_(0.5, 1.5)
    return m


def matrix() -> str:
    """README's support matrix (markdown, between the markers)."""
    rows = ["| family | `model_type` | import formats | invariants tested |", "|---|---|---|---|"]
    for f in FAMILIES:
        nums = [str(i) for i in range(1, len(INVARIANTS) + 1) if f.layer_types or i != LAYER_TYPES_INVARIANT]
        fmt = "HF folder, GGUF" if f.gguf else "HF folder"
        rows.append(f"| {f.name} | {', '.join(f'`{t}`' for t in f.model_types)} | {fmt} | {', '.join(nums)} |")
    legend = "; ".join(f"{i}. {s}" for i, s in enumerate(INVARIANTS, 1))
    notes = ["Invariants (`tests/test_families.py`, tiny random configs): " + legend + ". The self-test is also shown "
             "to fail on deliberately wrong seams (Gemma 2 output norms before the post-norms, Gemma 2 lost layer "
             "types, GPT-2 Conv1D weights untransposed).",
             "Generated by `python tests/families.py --write`; to add a family, follow "
             "the guide at the top of `flexigpt/model/arch.py` and add a tiny config to `tests/families.py`. GGUF: where "
             "transformers' GGUF loader knows the architecture. Encoder and encoder-decoder models are refused."]
    return "\n".join(["## Supported model families", "", rows[0], *rows[1:], "", *[n + "\n" for n in notes]]).rstrip()


def readme_section(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write_readme() -> None:
    text = README.read_text()
    block = f"{BEGIN}\n{matrix()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:  # first time: right after the "## What it does" section's stage table
        lines = text.split("\n")
        start = next(i for i, ln in enumerate(lines) if ln.startswith("## What it does"))
        t0 = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
        t1 = next(i for i in range(t0, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
        lines[t1:t1] = ["", block]
        text = "\n".join(lines)
    README.write_text(text)


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme()
    else:
        print(matrix())
