"""Write tiny random GGUF files that transformers' GGUF loader reads, one per model family.

A tiny transformers model is built from a config, its state dict is renamed to llama.cpp's tensor
names (``gguf``'s own name map) and put through the *inverse* of the tensor processors in
``transformers.modeling_gguf_pytorch_utils`` (Llama q/k permutation, Gemma ``norm + 1``, GPT-2
transposes), and the hyperparameters go in as the header keys ``GGUF_CONFIG_MAPPING`` reads.
The tokenizer is a byte-level BPE ("gpt2" type: 256 bytes, 5 merges, 1 control token), or for Gemma a
sentencepiece one (as real Gemma files carry), so the vocabulary (and the embedding) stays tiny.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, BLOCKS, CONTEXT = 64, 4, 2, 128, 2, 128
RMS_EPS = 1e-6

# model_type -> (GGUF general.architecture, general.name). llama.cpp stores Mistral as arch "llama"
# under a name like "Mistral-7B-Instruct-v0.3"; transformers loads that as Llama (same weights and
# maths). A name of exactly "mistral" would make transformers 5.24 load it as Mistral and crash
# (gguf-py has no "mistral" tensor map), so real files do not hit that path and neither do we.
GGUF_ARCH: dict[str, tuple[str, str]] = {
    "llama": ("llama", "tiny-llama"),
    "mistral": ("llama", "Mistral-tiny-v0.3"),
    "qwen2": ("qwen2", "tiny-qwen2"),
    "qwen3": ("qwen3", "tiny-qwen3"),
    "gemma2": ("gemma2", "tiny-gemma2"),
    "gemma3_text": ("gemma3", "tiny-gemma3"),
    "phi3": ("phi3", "tiny-phi3"),
    "gpt2": ("gpt2", "tiny-gpt2"),
}
# model_types a tiny GGUF cannot be written for, with the reason (none so far)
NOT_WRITABLE: dict[str, str] = {}
WRITABLE: tuple[str, ...] = tuple(t for t in GGUF_ARCH if t not in NOT_WRITABLE)

EOS = "<|endoftext|>"
# families written with a sentencepiece vocabulary, as real files are: transformers builds Gemma's
# tokenizer class for these, which does not survive save_pretrained + reload with a byte-level vocabulary
SPM_TOKENIZER = ("gemma2", "gemma3_text")


def byte_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): the 256 GPT-2 byte symbols, a few merges and one control token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]  # a handful, so BPE merging is exercised
    tokens = symbols + [m.replace(" ", "") for m in merges] + [EOS]
    types = [1] * (len(tokens) - 1) + [3]  # 1 NORMAL, 3 CONTROL
    return tokens, types, merges


VOCAB_SIZE = len(byte_vocab()[0])  # 262: the byte-level vocabulary most tiny files carry


def vocab_size(model_type: str) -> int:
    """The tiny model's vocabulary size: its tokenizer's."""
    return len(spm_vocab()[0]) if model_type in SPM_TOKENIZER else VOCAB_SIZE


def tiny_config(model_type: str) -> Any:
    """A tiny transformers config of ``model_type`` (2 blocks, hidden 64, 4 heads, 2 KV heads)."""
    from transformers import AutoConfig

    eos = VOCAB_SIZE - 1
    common: dict[str, Any] = dict(vocab_size=vocab_size(model_type), bos_token_id=eos, eos_token_id=eos,
                                  pad_token_id=eos)
    if model_type in SPM_TOKENIZER:
        common.update(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if model_type == "gpt2":
        # no GQA; MLP 4 x hidden (GGUF has no n_inner key); 1024 positions, because transformers maps
        # gpt2.context_length to n_ctx, not n_positions, so the wpe table must have GPT2Config's default size
        return AutoConfig.for_model("gpt2", n_embd=HIDDEN, n_layer=BLOCKS, n_head=HEADS, n_positions=1024,
                                    layer_norm_epsilon=1e-5, **common)
    kw: dict[str, Any] = dict(hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                              num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, rms_norm_eps=RMS_EPS,
                              max_position_embeddings=CONTEXT, **common)
    if model_type in ("gemma2", "gemma3_text"):
        kw.update(head_dim=HIDDEN // HEADS, sliding_window=32)
    return AutoConfig.for_model(model_type, **kw)


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of transformers' ``_reverse_permute_weights``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensor(model_type: str, gguf_name: str, w: np.ndarray, config: Any) -> np.ndarray:
    """The array llama.cpp's converter would store for this HF weight."""
    if model_type in ("llama", "mistral"):
        if ".attn_q." in gguf_name:
            return _permute_qk(w, config.num_attention_heads)
        if ".attn_k." in gguf_name:
            return _permute_qk(w, config.num_key_value_heads)
    if model_type in ("gemma2", "gemma3_text") and "norm.weight" in gguf_name:
        return w + 1  # llama.cpp stores Gemma's (1 + w) RMSNorm scale; transformers subtracts 1
    if model_type == "gpt2" and any(k in gguf_name for k in ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight",
                                                              "attn_output.weight")):
        return np.ascontiguousarray(w.T)  # HF Conv1D is (in, out); GGUF stores (out, in)
    return w


def header_fields(model_type: str, config: Any) -> dict[str, Any]:
    """The ``<arch>.*`` hyperparameter keys transformers maps to config attributes."""
    if model_type == "gpt2":
        return {"block_count": config.n_layer, "context_length": config.n_positions, "embedding_length": config.n_embd,
                "feed_forward_length": 4 * config.n_embd, "attention.head_count": config.n_head,
                "attention.layer_norm_epsilon": float(config.layer_norm_epsilon)}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    f: dict[str, Any] = {
        "context_length": config.max_position_embeddings, "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size, "embedding_length": config.hidden_size,
        "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "rope.freq_base": 10000.0,
        "vocab_size": config.vocab_size,
    }
    if model_type in ("llama", "mistral"):
        f["rope.dimension_count"] = head_dim
    if model_type in ("gemma2", "gemma3_text"):
        f["attention.key_length"] = head_dim
        f["attention.value_length"] = head_dim
        f["attention.sliding_window"] = config.sliding_window
    return f


def _add(writer: Any, key: str, value: Any) -> None:
    """One header key, typed the way llama.cpp's converter types it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores): a Gemma-style sentencepiece vocabulary (311 tokens).

    <pad> <eos> <bos> <unk>, the 256 byte-fallback tokens, then letters and a few merged pieces
    (Gemma's ids: pad 0, eos 1, bos 2).
    """
    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyz", "\u2581t", "\u2581a", "he", "in", "\u2581the", "er", "on", "an"]
    pieces += [f"\u2581{c}" for c in "bcdfgmnpqrsuwxyz"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += pieces
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(tokens) - 260)  # CONTROL, UNKNOWN, BYTE, NORMAL
    scores = [0.0] * 260 + [-float(i) for i in range(len(tokens) - 260)]
    return tokens, types, scores


def add_tokenizer(writer: Any, kind: str = "gpt2") -> None:
    """Tokenizer metadata transformers builds a fast tokenizer from: byte-level BPE ("gpt2"), or
    sentencepiece ("llama"), which is what real Gemma files carry."""
    if kind == "gpt2":
        tokens, types, merges = byte_vocab()
        eos = len(tokens) - 1
        fields: dict[str, Any] = {"model": "gpt2", "pre": "default", "tokens": tokens, "token_type": types,
                                  "merges": merges, "bos_token_id": eos, "eos_token_id": eos, "padding_token_id": eos}
    else:
        tokens, types, scores = spm_vocab()
        fields = {"model": "llama", "tokens": tokens, "token_type": types, "scores": scores, "bos_token_id": 2,
                  "eos_token_id": 1, "unknown_token_id": 3, "padding_token_id": 0, "add_bos_token": True}
    for key, value in fields.items():
        _add(writer, f"tokenizer.ggml.{key}", value)


def write_gguf(path: Path, architecture: str, name: str, fields: dict[str, Any], tensors: dict[str, np.ndarray],
               tokenizer: str = "gpt2") -> Path:
    """A float32 GGUF with ``general.*``, ``<architecture>.*`` header keys, the tokenizer and ``tensors``."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), architecture)  # writes general.architecture
    writer.add_name(name)
    writer.add_file_type(0)  # ALL_F32
    for key, value in fields.items():
        _add(writer, f"{architecture}.{key}", value)
    add_tokenizer(writer, tokenizer)
    for tname, arr in tensors.items():
        writer.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """The random tiny transformers model :func:`write_tiny_gguf` writes for ``model_type``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norm scales and biases, so a dropped or misnamed one shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n or n.rpartition(".")[0].endswith(("ln_1", "ln_2", "ln_f")):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


def write_tiny_gguf(model_type: str, path: Path, seed: int = 0) -> Path:
    """Write a small random float32 GGUF of ``model_type`` that transformers' GGUF loader reads.

    Loading it gives back :func:`tiny_model` ``(model_type, seed)`` (Mistral comes back as Llama).
    """
    import gguf

    if model_type not in GGUF_ARCH or model_type in NOT_WRITABLE:
        raise ValueError(f"no tiny GGUF writer for {model_type!r}: "
                         f"{NOT_WRITABLE.get(model_type, f'writable: {list(WRITABLE)}')}")
    architecture, name = GGUF_ARCH[model_type]
    model = tiny_model(model_type, seed)
    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture)
    name_map = gguf.get_tensor_name_map(arch_enum, BLOCKS)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors: dict[str, np.ndarray] = {}
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp omits output.weight for tied embeddings; transformers then ties
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise KeyError(f"{model_type}: no GGUF name for {hf_name}")
        gname = f"{gguf_base}.{suffix}"
        tensors[gname] = to_gguf_tensor(model_type, gname, t.float().numpy(), config)
    tokenizer = "llama" if model_type in SPM_TOKENIZER else "gpt2"
    return write_gguf(path, architecture, name, header_fields(model_type, config), tensors, tokenizer)


def write_foreign_gguf(path: Path, architecture: str) -> Path:
    """A valid GGUF of an ``architecture`` transformers cannot load (one small tensor, tokenizer metadata)."""
    fields = {"block_count": 1, "embedding_length": 8, "context_length": 16, "attention.head_count": 2}
    return write_gguf(path, architecture, f"tiny-{architecture}", fields,
                      {"token_embd.weight": np.zeros((VOCAB_SIZE, 8), dtype=np.float32)})
