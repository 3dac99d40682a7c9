"""FlexiGPT: prune and extend LLMs with low-rank weight sharing (Smith et al., NAACL 2025)."""
from __future__ import annotations

from flexigpt.errors import FlexiError

__version__ = "0.1.0"
__all__ = ["FlexiError", "__version__", "load", "save", "export"]


def load(path, dtype=None, verify: bool = True):
    """Load a compact flexigpt checkpoint as a transformers model (see :mod:`flexigpt.model.checkpoint`)."""
    from flexigpt.model.checkpoint import load as _load

    return _load(path, dtype=dtype, verify=verify)


def save(model, path, tokenizer=None, merged: bool = False):
    """Save a FlexiGPT/ShortGPT/extended model in the compact format (``merged``: kept blocks' LoRA folded)."""
    from flexigpt.model.checkpoint import save as _save

    return _save(model, path, tokenizer=tokenizer, merged=merged)


def export(model, path, tokenizer=None):
    """Write a plain HF checkpoint with adapters merged into per-position copies (no storage saving)."""
    from flexigpt.model.checkpoint import export_plain

    return export_plain(model, path, tokenizer=tokenizer)
