"""Compact checkpoints: unique base weights once + layer map + adapters + norms, with checksums.

Layout of a compact folder::

    config.json            base model config (original depth), tokenizer files
    base.safetensors       every unique non-adapter tensor, once (shared blocks are not duplicated)
    adapters.safetensors   LoRA A/B and output-norm γ
    flexigpt.json          format version, FlexiSpec (layer map), sha256 of every tensor and file

Two forms, both read by :func:`load` (``flexigpt.json`` ``form``; absent = unmerged):

* ``unmerged`` (default): the model as trained, LoRA on every kept block too, so every block runs
  an adapter at inference.
* ``merged`` (``save(..., merged=True)``, :func:`merge`): each kept block's LoRA is folded into its
  (shared) weights, ``W_k' = W_k + s B_k A_k``; a replaced position ``p`` that shares block ``k``
  then gets the exact correction ``B' = [s_p B_p, -s B_k]``, ``A' = [A_p; A_k]`` (rank 2r,
  scaling 1), so ``W_k' + B'A' = W_k + s_p B_p A_p``. Kept blocks run no adapter; only the replaced
  positions do. It is an ordinary layer map (a :class:`~flexigpt.model.flexi.FlexiSpec` with
  rank-2r LoRA on the replaced positions only), so loading it needs nothing new.

``export_plain`` instead writes per-position copies with the adapters merged: it is loadable
by ``AutoModelForCausalLM`` but gives up the storage saving (shared blocks are written once per
position).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexigpt.model import flexi as fm
from flexigpt.model.arch import Arch, arch_of
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_dir, sha256_file

FORMAT = "flexigpt-compact/1"
MANIFEST = "flexigpt.json"
FORMS = ("unmerged", "merged")
MANIFEST_KEYS = ("format", "spec", "tensors", "files")


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with each storage once (first name wins): tied/shared tensors are not repeated."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t
    return out


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, merged: bool = False) -> dict[str, int]:
    """Write ``model`` (built by :func:`flexi_model.build`) as a compact folder; returns byte counts.

    ``merged``: write the merged form (kept blocks' LoRA folded, see the module docstring); ``model``
    itself is left as it is.
    """
    if merged:
        model = merge(model)
    spec = fm.spec_of(model)
    state = unique_state(model)
    base = {k: v.contiguous() for k, v in state.items() if not fm.is_adapter_param(k)}
    adapters = {k: v.contiguous() for k, v in state.items() if fm.is_adapter_param(k)}
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.flexigpt_base_config, indent=2, default=str))
        save_file(base, str(tmp / "base.safetensors"), metadata={"format": FORMAT})
        save_file(adapters, str(tmp / "adapters.safetensors"), metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "spec": spec.to_dict(),
            "tensors": {k: tensor_sha256(v) for k, v in state.items()},
            "files": {f: sha256_file(tmp / f) for f in ("base.safetensors", "adapters.safetensors")},
        }
        if form_of(model) == "merged":  # unmerged manifests stay byte-identical to before the merged form
            manifest["form"] = "merged"
            if getattr(model, "flexigpt_merged_from", None) is not None:
                manifest["merged_from"] = model.flexigpt_merged_from.to_dict()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"base_bytes": (Path(path) / "base.safetensors").stat().st_size,
            "adapter_bytes": (Path(path) / "adapters.safetensors").stat().st_size}


def _read_manifest(p: Path) -> dict:
    if not (p / MANIFEST).is_file():
        raise FlexiError("checkpoint", f"{p} has no {MANIFEST}, so it is not a flexigpt compact checkpoint",
                         "point at a folder written by flexigpt.save (e.g. artifacts/flexigpt_init)")
    fix = "re-run the stage that wrote it (svd_init / train_*), or re-save it with flexigpt.save"
    try:
        m = json.loads((p / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # truncated or garbage: name the file, not a traceback
        raise FlexiError("checkpoint", f"{p / MANIFEST} is not valid JSON (truncated or corrupt: {e})", fix) from None
    if not isinstance(m, dict):
        raise FlexiError("checkpoint", f"{p / MANIFEST} holds a {type(m).__name__}, not a manifest object", fix)
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise FlexiError("checkpoint", f"{p / MANIFEST} lacks the keys {missing}", fix)
    if m["format"] != FORMAT:
        raise FlexiError("checkpoint", f"format {m['format']!r} is not {FORMAT!r}", "re-save it with this version")
    bad = [k for k in MANIFEST_KEYS[1:] if not isinstance(m[k], dict)]
    if bad or m.get("form", "unmerged") not in FORMS:
        raise FlexiError("checkpoint", f"{p / MANIFEST} has malformed entries {bad or ['form']}", fix)
    for key in ("spec", "merged_from"):
        if key in m:
            _spec(m, key, p)  # a malformed layer map fails here, before any weights load
    return m


def _spec(m: dict, key: str, p: Path) -> fm.FlexiSpec:
    """The manifest's layer map ``key`` as a FlexiSpec, or a FlexiError naming the file."""
    try:
        return fm.FlexiSpec.from_dict(m[key])
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise FlexiError("checkpoint", f"{p / MANIFEST} has a malformed layer map ({key}): {e}",
                         "re-run the stage that wrote it (svd_init / train_*), or re-save it with flexigpt.save"
                         ) from None


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, verify: bool = True) -> nn.Module:
    """Load a compact folder as a transformers model (works with ``generate()`` and lm-eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    man = _read_manifest(p)
    for f, h in man["files"].items():
        if not (p / f).is_file():
            raise FlexiError("checkpoint", f"{p / f} is missing", "restore the file or re-run the stage that wrote it")
        if verify and sha256_file(p / f) != h:
            raise FlexiError("checkpoint", f"{p / f} does not match its checksum in {MANIFEST} (tampered or corrupt)",
                             "re-run the stage that wrote it")
    tensors = {**load_file(str(p / "base.safetensors")), **load_file(str(p / "adapters.safetensors"))}
    missing = sorted(set(man["tensors"]) - set(tensors))
    if missing:
        raise FlexiError("checkpoint", f"missing tensors {missing[:5]}", "re-run the stage that wrote it")
    if verify:
        bad = [k for k, h in man["tensors"].items() if tensor_sha256(tensors[k]) != h]
        if bad:
            raise FlexiError("checkpoint", f"tensors {bad[:5]} do not match their checksums (tampered)",
                             "re-run the stage that wrote it")
    cfg_dict = json.loads((p / "config.json").read_text())
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    first = next(iter(tensors.values()))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or first.dtype)
    fm.build(model, _spec(man, "spec", p), init=False)
    expected = set(unique_state(model))
    if expected != set(tensors):
        raise FlexiError("checkpoint", f"tensor names do not match the layer map "
                         f"(extra {sorted(set(tensors) - expected)[:3]}, missing {sorted(expected - set(tensors))[:3]})",
                         "re-save the checkpoint")
    model.load_state_dict(tensors, strict=False)
    if man.get("form") == "merged":
        model.flexigpt_form = "merged"
        model.flexigpt_merged_from = _spec(man, "merged_from", p) if "merged_from" in man else None
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def dir_bytes(path: str | os.PathLike, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(f"*{suffix}"))


# -- the merged form ------------------------------------------------------------------------------

def form_of(model: nn.Module) -> str:
    """``merged`` for a model from :func:`merge` (or loaded from a merged folder), else ``unmerged``."""
    return getattr(model, "flexigpt_form", "unmerged")


def _owners(spec: fm.FlexiSpec) -> dict[int, int]:
    """Replaced position -> the kept position holding the weights it shares (when there is one)."""
    replaced = set(spec.replaced)
    holder = {s: p for p, s in enumerate(spec.sources) if p not in replaced}
    return {p: holder[spec.sources[p]] for p in spec.replaced if spec.sources[p] in holder}


def merged_spec(spec: fm.FlexiSpec) -> fm.FlexiSpec:
    """The layer map of the merged form: no LoRA on kept positions; rank-2r, scaling-1 LoRA on the
    replaced positions that had their own LoRA or share a folded block. Nothing to fold: ``spec``."""
    lora_on, replaced = set(spec.lora_positions), set(spec.replaced)
    folded = lora_on - replaced
    if not folded:
        return spec
    owners = _owners(spec)
    corrected = [p for p in spec.replaced if p in lora_on or owners.get(p) in folded]
    r2 = 2 * spec.lora.rank
    lora = fm.LoraSettings(rank=r2, alpha=r2, targets=list(spec.lora.targets), init="zeros")
    return replace(spec, lora_positions=corrected, lora=lora)


def _scaled_lora(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scaling·B, A) of a PEFT LoRA linear, in float32; None for a plain linear."""
    if not (hasattr(mod, "lora_A") and fm.ADAPTER_NAME in mod.lora_A):
        return None
    a, b = mod.lora_A[fm.ADAPTER_NAME].weight, mod.lora_B[fm.ADAPTER_NAME].weight
    return mod.scaling[fm.ADAPTER_NAME] * b.detach().float(), a.detach().float()


def merge(model: nn.Module) -> nn.Module:
    """A new model in the merged form (module docstring); ``model`` is not changed.

    Logits agree with ``model``'s to float rounding (``tests/test_serve.py``). A model already merged,
    or with nothing to fold (no LoRA on kept positions), is returned as is.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = fm.spec_of(model)
    if spec is None:
        raise FlexiError("checkpoint", "the model is not a flexigpt model (no layer map), so it has no merged form",
                         "merge a model built by flexigpt (variants.build_variant) or loaded with flexigpt.load")
    mspec = merged_spec(spec)
    if form_of(model) == "merged" or mspec is spec:
        return model
    arch, owners = arch_of(model), _owners(spec)
    targets = fm.resolved_targets(arch, spec.lora)
    for p in mspec.lora_positions:
        for n, w in arch.weights(p).items():
            if arch.target_of(n) in targets and 2 * spec.lora.rank > min(w.shape):
                raise FlexiError("adapters.rank", f"the merged form needs rank {2 * spec.lora.rank} on {n} "
                                 f"({tuple(w.shape)}), more than it has", "save the unmerged form (merged=False)")
    # W_k' = W_k + s B_k A_k for every kept position with LoRA, keyed by the shared tensor's storage
    folded: dict[int, torch.Tensor] = {}
    for k in sorted(set(spec.lora_positions) - set(spec.replaced)):
        for n, mod in arch.linears(k).items():
            if (ba := _scaled_lora(mod)) is not None:
                w, delta = mod.base_layer.weight, ba[0] @ ba[1]
                delta = delta.T if Arch.stores_in_by_out(mod) else delta  # Conv1D keeps W as in x out
                folded[w.data_ptr()] = (w.detach().float() + delta).to(w.dtype)
    cfg = dict(model.flexigpt_base_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the skeleton's random init must not move the caller's RNG
        out = AutoModelForCausalLM.from_config(config, dtype=dtype)
        fm.build(out, mspec, init=False)
    src = {n.replace(".base_layer.", "."): t for n, t in model.state_dict().items() if not fm.is_lora_param(n)}
    state = {}
    for name in out.state_dict():
        if not fm.is_lora_param(name):
            t = src[name.replace(".base_layer.", ".")]
            state[name] = folded.get(t.data_ptr(), t)
    out.load_state_dict(state, strict=False)
    out_arch = arch_of(out)
    with torch.no_grad():
        for p in mspec.lora_positions:  # exact corrections [s_p B_p, -s B_k] [A_p; A_k]
            for n, mod in out_arch.linears(p).items():
                if not hasattr(mod, "lora_A"):
                    continue
                w, r = arch.weights(p)[n], spec.lora.rank
                zero = (w.new_zeros((w.shape[0], r), dtype=torch.float32),
                        w.new_zeros((r, w.shape[1]), dtype=torch.float32))
                own = _scaled_lora(arch.linears(p)[n]) or zero
                kept = _scaled_lora(arch.linears(owners[p])[n]) if p in owners else None
                kept = kept or zero
                mod.lora_B[fm.ADAPTER_NAME].weight.copy_(torch.cat([own[0], -kept[0]], dim=1))
                mod.lora_A[fm.ADAPTER_NAME].weight.copy_(torch.cat([own[1], kept[1]], dim=0))
    out.flexigpt_form, out.flexigpt_merged_from = "merged", spec
    return out.to(next(model.parameters()).device).eval()


def form_sizes(model: nn.Module, tokenizer=None) -> dict[str, dict[str, int]]:
    """Stored parameters and on-disk bytes of both forms of ``model`` (each saved to a temp folder).

    Returns ``{"unmerged": {...}, "merged": {...}}`` with ``stored_params`` (every tensor once),
    ``adapter_params`` (LoRA and output norms) and ``bytes`` (the folder's safetensors files).
    """
    forms = {"merged": merge(model)}
    if form_of(model) == "unmerged":  # a model loaded merged: its unmerged form is not known here
        forms = {"unmerged": model, **forms}
    out: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as d:
        for form, m in forms.items():
            save(m, Path(d) / form, tokenizer=tokenizer)
            out[form] = {"stored_params": fm.unique_params(m), "adapter_params": fm.adapter_params(m),
                         "bytes": dir_bytes(Path(d) / form)}
    return out


_REMOTE_CODE = '''"""FlexiGPT export: {base} plus gamma-only LayerNorms on the outputs of the listed blocks' sublayers.

Written by flexigpt.model.checkpoint.export_plain. Load with
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base}


class OutputNorm(nn.Module):
    """h -> gamma * (h - mean(h)) / std(h) over the hidden dim (FlexiGPT Eq. 6), before the residual add."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, h):
        return (F.layer_norm(h.float(), h.shape[-1:], eps=self.eps) * self.gamma.float()).to(h.dtype)

    def hook(self, module, args, out):
        return (self(out[0]), *out[1:]) if isinstance(out, tuple) else self(out)


try:  # transformers 5 renames some families' checkpoint keys by class name (GPT-NeoX embed_out): inherit the base's
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
    if get_checkpoint_conversion_mapping("{base}"):
        register_checkpoint_conversion_mapping("FlexiGPT{base}", get_checkpoint_conversion_mapping("{base}"),
                                               overwrite=True)
except ImportError:
    pass


class FlexiGPT{base}({base}):
    def __init__(self, config):
        super().__init__(config)
        spec = config.flexigpt_output_norms
        blocks = self.get_submodule(spec["blocks_path"])
        for p in spec["positions"]:
            for attr, target in (("flexi_attn_out_norm", spec["attn_out"]), ("flexi_mlp_out_norm", spec["mlp_out"])):
                norm = OutputNorm(spec["dim"] if "dim" in spec else config.hidden_size, spec["eps"])
                setattr(blocks[p], attr, norm)
                blocks[p].get_submodule(target).register_forward_hook(norm.hook)
'''


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-position plain weights: W = W_shared + scaling·B·A for every LoRA linear; no sharing."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if fm.is_lora_param(name):
            continue
        out[name.replace(".base_layer.", ".")] = t.detach().clone()
    for mname, mod in model.named_modules():
        if hasattr(mod, "lora_A") and fm.ADAPTER_NAME in mod.lora_A:
            a, b = mod.lora_A[fm.ADAPTER_NAME].weight, mod.lora_B[fm.ADAPTER_NAME].weight
            key = f"{mname}.weight"
            w, delta = out[key], b.float() @ a.float()
            delta = delta.T if Arch.stores_in_by_out(mod) else delta  # Conv1D keeps W as in x out
            out[key] = (w.float() + mod.scaling[fm.ADAPTER_NAME] * delta).to(w.dtype)
    return out


def export_plain(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> dict[str, int]:
    """Write a HF checkpoint with adapters merged into per-position copies (no storage saving).

    Without output norms (ShortGPT, ShortGPT+LoRA, ``output_norm: false``) the result is the
    base architecture itself: vLLM and llama.cpp load it as is. Output norms (a LayerNorm of a
    sublayer output) cannot be folded into any weight, so with them the folder also carries a
    30-line subclass (``modeling_flexigpt.py``) and needs ``trust_remote_code=True``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = fm.spec_of(model)
    arch = arch_of(model)
    state = merged_state(model)
    cfg_dict = model.config.to_dict()
    base_cls = type(model).__name__
    norms = spec.output_norm and bool(spec.replaced)
    if norms:
        cfg_dict["flexigpt_output_norms"] = {"positions": spec.replaced, "eps": spec.norm_eps,
                                             "blocks_path": arch.blocks_path,
                                             "attn_out": arch.attn_residual, "mlp_out": arch.mlp_residual}
        if arch.text_config_key:  # multimodal: the hidden size lives in the text config
            cfg_dict["flexigpt_output_norms"]["dim"] = arch.hidden_size
        cfg_dict["auto_map"] = {"AutoModelForCausalLM": f"modeling_flexigpt.FlexiGPT{base_cls}"}
        cfg_dict["architectures"] = [f"FlexiGPT{base_cls}"]
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    if norms:
        plain.flexigpt_spec = spec
        fm.attach_output_norms(arch_of(plain), spec.replaced, 1.0, spec.norm_eps)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    with atomic_dir(path) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        if norms:
            (tmp / "modeling_flexigpt.py").write_text(_REMOTE_CODE.format(base=base_cls))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {"export_bytes": dir_bytes(path)}


def dir_bytes_of_model(model: nn.Module) -> int:
    """Bytes a dense model takes as safetensors (each unique tensor once)."""
    return sum(t.numel() * t.element_size() for t in unique_state(model).values())
