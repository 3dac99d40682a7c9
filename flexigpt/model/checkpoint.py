"""Compact checkpoints: unique base weights once + layer map + adapters + norms, with checksums.

Layout of a compact folder::

    config.json            base model config (original depth), tokenizer files
    base.safetensors       every unique non-adapter tensor, once (shared blocks are not duplicated)
    adapters.safetensors   LoRA A/B and output-norm γ
    flexigpt.json          format version, FlexiSpec (layer map), sha256 of every tensor and file

``export_plain`` instead writes per-position copies with the adapters merged: it is loadable
by ``AutoModelForCausalLM`` but gives up the storage saving (shared blocks are written once per
position).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_dir, sha256_file

FORMAT = "flexigpt-compact/1"
MANIFEST = "flexigpt.json"


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


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> dict[str, int]:
    """Write ``model`` (built by :func:`flexi_model.build`) as a compact folder; returns byte counts."""
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {"base_bytes": (Path(path) / "base.safetensors").stat().st_size,
            "adapter_bytes": (Path(path) / "adapters.safetensors").stat().st_size}


def _read_manifest(p: Path) -> dict:
    if not (p / MANIFEST).is_file():
        raise FlexiError("checkpoint", f"{p} has no {MANIFEST}, so it is not a flexigpt compact checkpoint",
                         "point at a folder written by flexigpt.save (e.g. artifacts/flexigpt_init)")
    m = json.loads((p / MANIFEST).read_text())
    if m.get("format") != FORMAT:
        raise FlexiError("checkpoint", f"format {m.get('format')!r} is not {FORMAT!r}", "re-save it with this version")
    return m


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
    fm.build(model, fm.FlexiSpec.from_dict(man["spec"]), init=False)
    expected = set(unique_state(model))
    if expected != set(tensors):
        raise FlexiError("checkpoint", f"tensor names do not match the layer map "
                         f"(extra {sorted(set(tensors) - expected)[:3]}, missing {sorted(expected - set(tensors))[:3]})",
                         "re-save the checkpoint")
    model.load_state_dict(tensors, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def dir_bytes(path: str | os.PathLike, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(f"*{suffix}"))


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


class FlexiGPT{base}({base}):
    def __init__(self, config):
        super().__init__(config)
        spec = config.flexigpt_output_norms
        blocks = self.get_submodule(spec["blocks_path"])
        for p in spec["positions"]:
            for attr, target in (("flexi_attn_out_norm", spec["attn_out"]), ("flexi_mlp_out_norm", spec["mlp_out"])):
                norm = OutputNorm(config.hidden_size, spec["eps"])
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
            w = out[key]
            out[key] = (w.float() + mod.scaling[fm.ADAPTER_NAME] * (b.float() @ a.float())).to(w.dtype)
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
