"""The evaluation protocol of one model: perplexities under labelled protocols, zero-shot tasks, costs.

:func:`evaluate_model` is what the ``evaluate@<variant>`` stages and the benchmarks run, so a
benchmark number and a pipeline number come from the same code with the same settings
(:class:`EvaluateSettings`, params ``evaluate.*``; benchmarks pass overrides).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexigpt.config import Settings, check_int, setting
from flexigpt.devices import resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.evaluate import cost, lm_tasks, perplexity


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """What every evaluated variant is measured on (params ``evaluate.*``)."""

    SECTION = "evaluate"
    variants: dict = setting(help="variant -> folder to evaluate (HF folder, plan folder or compact folder); "
                                  "required, one entry per evaluate@<variant> stage", type=dict)
    tasks: list = setting(list(lm_tasks.TASKS), "lm-eval zero-shot tasks (the paper average uses the first five)")
    limit: Any = setting(30, "docs per task (first N); null = all; or a {task: N} map", type=object, nullable=True)
    ppl_windows: list = setting([2048, 512], "WikiText-2 token-PPL window lengths")
    ppl_max_windows: int | None = setting(4, "first N windows per length; null = the whole test set",
                                          type=int, min=1)
    lm_eval_wikitext: bool = setting(False, "also report lm-eval's wikitext word perplexity (third protocol)")
    speed: bool = setting(False, "time the variant against dense side by side (forward, decode, merged, "
                                 "self-speculative) into the run record")
    wikitext_docs: int | None = setting(2, "documents of lm-eval's wikitext task; null = all", type=int, min=1)
    batch_size: int = setting(8, "lm-eval / PPL batch size (sequences)", min=1)
    dtype: str = setting("auto", "auto | bfloat16 | float32", choices=("auto", "bfloat16", "float32"))

    def check(self) -> None:
        lm_tasks.check_tasks(self.tasks)
        lm_tasks.check_limits(self.limit, lm_tasks.check_tasks(self.tasks))
        if not self.ppl_windows:
            raise FlexiError("evaluate.ppl_windows", "must list at least one window length", "write e.g. [2048, 512]")
        for w in self.ppl_windows:
            check_int("evaluate.ppl_windows", w, min=2)
        for name, path in self.variants.items():
            if not isinstance(path, str) or not path:
                raise FlexiError(f"evaluate.variants.{name}", f"must be a folder path, got {path!r}",
                                 "write e.g. `flexigpt: artifacts/trained/flexigpt`")

    def check_model(self, max_positions: int | None) -> None:
        """Checks against the evaluated model's context, before any evaluation starts."""
        for w in self.ppl_windows:
            if max_positions is not None and w > max_positions:
                raise FlexiError("evaluate.ppl_windows", f"window {w} exceeds the model's {max_positions} positions",
                                 f"use windows of at most {max_positions} tokens, e.g. [{min(2048, max_positions)}, 512]")

    @property
    def all_tasks(self) -> list[str]:
        """The tasks run through lm-eval: the accuracy tasks, plus ``wikitext`` when asked for."""
        return lm_tasks.check_tasks(self.tasks) + (["wikitext"] if self.lm_eval_wikitext else [])

    def limits(self) -> dict[str, int | None]:
        tasks = lm_tasks.check_tasks(self.tasks)
        out = lm_tasks.check_limits(self.limit, tasks)
        return {**out, **({"wikitext": self.wikitext_docs} if self.lm_eval_wikitext else {})}

    def sample_settings(self, dtype: str, heldout_shape: tuple[int, ...]) -> dict[str, Any]:
        """What two models' per-sample results must share to be paired (everything but the model)."""
        return {"tasks": lm_tasks.check_tasks(self.tasks), "limits": self.limits(), "ppl_windows": list(self.ppl_windows),
                "ppl_max_windows": self.ppl_max_windows, "dtype": dtype, "heldout_shape": list(heldout_shape)}

    def data_files(self, data_dir: Path) -> dict[str, Path]:
        """Every data file the evaluation reads (a missing one is named before any model loads)."""
        files = lm_tasks.data_files(data_dir, self.all_tasks)
        files["wikitext2_rows"] = perplexity.wikitext2_file(data_dir)
        return files


def evaluate_model(model: nn.Module, tokenizer, s: EvaluateSettings, data_dir: Path, heldout: torch.Tensor,
                   device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Evaluate one (already placed) model; returns ``(record, raw lm-eval results, per-sample results)``.

    The record holds every PPL with its protocol, per-task metrics, the paper average and the cost
    accounting; nothing in it depends on wall-clock time. The per-sample results (each document's
    correctness, each window's NLL) are what paired comparisons between models bootstrap over.
    """
    dtype = resolve_dtype(s.dtype, device)
    out: dict[str, Any] = {"dtype": dtype, "protocols": {}}
    nll: dict[str, list[float]] = {}
    h = perplexity.heldout_ppl(model, heldout, batch_size=s.batch_size, dtype=dtype, progress=True)
    out["heldout_ppl"], out["protocols"]["heldout_ppl"] = h["ppl"], h["protocol"]
    nll["heldout"] = h["window_nll"]
    for w in s.ppl_windows:
        r = perplexity.wikitext2_token_ppl(model, tokenizer, data_dir, w, batch_size=1, dtype=dtype,
                                           max_windows=s.ppl_max_windows, progress=True)
        out[f"wikitext2_ppl_{w}"], out["protocols"][f"wikitext2_ppl_{w}"] = r["ppl"], r["protocol"]
        nll[f"wikitext2_{w}"] = r["window_nll"]
    zs = lm_tasks.run_zero_shot(model, tokenizer, s.all_tasks, data_dir, s.limits(), batch_size=s.batch_size,
                                dtype=dtype)
    wt = zs["tasks"].pop("wikitext", None)
    if wt:
        out["lmeval_wikitext_word_ppl"] = wt.get("word_perplexity")
        out["protocols"]["lmeval_wikitext_word_ppl"] = (f"lm-eval wikitext (document level) word_perplexity, "
                                                        f"first {zs['n_docs'].get('wikitext')} documents")
    out["tasks"] = zs["tasks"]
    out["n_docs"] = zs["n_docs"]
    tasks = lm_tasks.check_tasks(s.tasks)
    out["paper_average"] = lm_tasks.paper_average(zs) if set(lm_tasks.PAPER_TASKS) <= set(tasks) else None
    out["cost"] = cost.count_cost(model).to_dict()
    samples = {"settings": s.sample_settings(dtype, tuple(heldout.shape)), "tasks": zs["samples"], "nll": nll,
               "protocols": out["protocols"]}
    return out, zs["raw"], samples
