"""Serving: greedy generation, self-speculative decoding with a skip-draft (paper §4.2).

The merged compact format (kept blocks' LoRA folded into their weights) lives with the rest of
the format in :mod:`flexigpt.model.checkpoint` (``save(..., merged=True)``, ``merge``).
"""
from flexigpt.serve.speculative import (GenerateStats, check_greedy, check_skip, generate, make_draft,
                                       make_skip_draft)

__all__ = ["GenerateStats", "check_greedy", "check_skip", "generate", "make_draft", "make_skip_draft"]
