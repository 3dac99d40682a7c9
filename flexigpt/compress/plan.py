"""Pruning plan: which blocks to prune, and which unpruned block each one shares weights with.

Step (a), the pruned set: the ``n`` blocks with the lowest importance score, with
``n = round_half_up(ratio * L)`` (ratio 0.3 on SmolLM2's 30 blocks gives 9), or an explicit list.
The parameter saving is reported ShortGPT-style: the pruned blocks' own parameters over the
model's unique parameters (tied embeddings counted once).

Step (b), the bases: for each pruned block the unpruned block at the smallest distance (paper
Eqs. 2-5), computed by :mod:`flexigpt.compress.distance`. :class:`PruneSettings` (params
``prune.*``) is validated once, when it is built; :func:`make_plan` and the distance code trust it.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from flexigpt.compress.distance import AGGREGATES, METRICS, PRECISIONS, SVD_METHODS, choose_bases, distance_table
from flexigpt.config import Settings, setting
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_file, write_json
from flexigpt.model.arch import arch_of
from flexigpt.model.flexi import unique_params
from flexigpt.model.stream import StreamedModel, StreamSettings


BASE_LAYER_TYPES = ("same", "any")


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneSettings(Settings):
    """Which blocks go and how each one's base is chosen (params ``prune.*``)."""

    SECTION = "prune"
    ratio: float | None = setting(0.3, "fraction of blocks to prune, in (0, 1); null when `blocks` is set",
                                  type=float, min=0.0, max=1.0, min_exclusive=True, nullable=True)
    blocks: list | None = setting(None, "explicit block indices to prune; null = use `ratio`", type=list)
    rank: int = setting(32, "truncation rank r of Eqs. 2-4 (clamped per matrix to min(m, n))", min=1)
    metric: str = setting("lowrank", "base distance", choices=METRICS)
    aggregate: str = setting("sum_sq", "per-block distance from per-matrix ones", choices=AGGREGATES)
    svd: str = setting("gram", "truncated SVD of each weight", choices=SVD_METHODS)
    precision: str = setting("float64", "dtype of the base-distance SVDs and eigenproblems", choices=tuple(PRECISIONS))
    base_layer_type: str = setting("same", "bases for families with per-layer attention types (sliding / global): "
                                   "same = only a kept block of the pruned block's type | any = ignore the type",
                                   choices=BASE_LAYER_TYPES)

    def check(self) -> None:
        if self.ratio is not None and self.blocks is not None:
            raise FlexiError("prune.blocks", "both prune.ratio and prune.blocks are set",
                             "set prune.blocks to null to prune by ratio, or prune.ratio to null to use the list")
        if self.ratio is None and self.blocks is None:
            raise FlexiError("prune.ratio", "neither prune.ratio nor prune.blocks is set",
                             "set prune.ratio (e.g. 0.3) or list prune.blocks")
        if self.ratio is not None and self.ratio >= 1.0:
            raise FlexiError("prune.ratio", f"must lie strictly between 0 and 1, got {self.ratio}",
                             "set `prune.ratio` to a fraction of blocks, e.g. 0.3")


# -- the pruned set -------------------------------------------------------------------------------
def n_from_ratio(ratio: Any, num_blocks: int, param: str = "prune.ratio") -> int:
    """Number of blocks to prune, ``floor(ratio * L + 0.5)``; must leave 1..L-1 blocks pruned."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise FlexiError(param, f"must be a number in (0, 1), got {ratio!r}", f"set `{param}` to e.g. 0.3")
    if not 0.0 < ratio < 1.0:
        raise FlexiError(param, f"must lie strictly between 0 and 1, got {ratio}",
                         f"set `{param}` to a fraction of blocks, e.g. 0.3")
    n = int(math.floor(ratio * num_blocks + 0.5))
    if n == 0:
        raise FlexiError(param, f"{ratio} x {num_blocks} blocks rounds to 0, so nothing would be pruned",
                         f"set `{param}` to at least {0.5 / num_blocks:.3g}")
    if n >= num_blocks:
        raise FlexiError(param, f"{ratio} x {num_blocks} blocks rounds to {n}, so every block would be pruned",
                         f"set `{param}` below {(num_blocks - 0.5) / num_blocks:.3g}")
    return n


def check_blocks(blocks: Any, num_blocks: int, param: str = "prune.blocks") -> list[int]:
    """An explicit pruned list: distinct block indices in [0, L), at least one block kept."""
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise FlexiError(param, f"must be a non-empty list of block indices, got {blocks!r}",
                         f"write e.g. `{param}: [3, 12, 13]`, or set it to null and use prune.ratio")
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int)]
    if bad:
        raise FlexiError(param, f"entries must be whole numbers, got {bad}", "list integer block indices")
    out = [b for b in blocks if not 0 <= b < num_blocks]
    if out:
        raise FlexiError(param, f"indices {out} are out of range for a model with {num_blocks} blocks",
                         f"use indices from 0 to {num_blocks - 1}")
    dups = sorted({b for b in blocks if blocks.count(b) > 1})
    if dups:
        raise FlexiError(param, f"lists blocks {dups} more than once", "list each block once")
    if len(blocks) >= num_blocks:
        raise FlexiError(param, f"would prune all {num_blocks} blocks, leaving no base block",
                         "keep at least one block unpruned")
    return sorted(blocks)


def choose_pruned(scores: list[float], ratio: float | None = None, blocks: list[int] | None = None) -> list[int]:
    """The pruned blocks (sorted): the ``n(ratio)`` lowest scores (ties: lower index), or ``blocks``."""
    L = len(scores)
    if ratio is not None and blocks is not None:
        raise FlexiError("prune.blocks", "both prune.ratio and prune.blocks are set",
                         "set prune.blocks to null to prune by ratio, or prune.ratio to null to use the list")
    if blocks is not None:
        return check_blocks(blocks, L)
    if ratio is None:
        raise FlexiError("prune.ratio", "neither prune.ratio nor prune.blocks is set",
                         "set prune.ratio (e.g. 0.3) or list prune.blocks")
    n = n_from_ratio(ratio, L)
    order = sorted(range(L), key=lambda i: (scores[i], i))
    return sorted(order[:n])


# -- the plan -----------------------------------------------------------------------------------
@dataclass
class Plan:
    """A pruning plan; ``layer_map[p]`` is the block whose weights position ``p`` runs."""

    num_blocks: int
    pruned: list[int]
    base: dict[int, int]
    distances: dict[int, dict[int, float]]
    layer_map: list[int]
    params_before: int
    params_after: int
    removed_param_fraction: float
    metric: str
    aggregate: str
    rank: int
    effective_rank: dict[str, int] = field(default_factory=dict)
    ratio: float | None = None
    importance_method: str | None = None
    scores: list[float] | None = None
    # per-block attention types and the base rule, for families that have them (None: one type)
    layer_types: list[str] | None = None
    base_layer_type: str | None = None

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what the prune stage reports as metrics)."""
        chosen = [self.distances[i][self.base[i]] for i in self.pruned]
        return {"num_blocks": self.num_blocks, "num_pruned": len(self.pruned), "params_before": self.params_before,
                "params_after": self.params_after, "removed_param_fraction": round(self.removed_param_fraction, 6),
                "mean_base_distance": sum(chosen) / len(chosen),
                "mean_base_offset": sum(abs(i - self.base[i]) for i in self.pruned) / len(self.pruned)}

    @property
    def kept(self) -> list[int]:
        return [b for b in range(self.num_blocks) if b not in set(self.pruned)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["layer_types"] is None:  # a one-type model's plan reads as before
            del d["layer_types"], d["base_layer_type"]
        d["base"] = {str(i): j for i, j in self.base.items()}
        d["distances"] = {str(i): {str(j): v for j, v in row.items()} for i, row in self.distances.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        d["base"] = {int(i): int(j) for i, j in d["base"].items()}
        d["distances"] = {int(i): {int(j): float(v) for j, v in row.items()} for i, row in d["distances"].items()}
        d["pruned"] = [int(i) for i in d["pruned"]]
        d["layer_map"] = [int(i) for i in d["layer_map"]]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """A plan from ``plan.json`` or from the folder holding it."""
        p = Path(path)
        p = p / "plan.json" if p.is_dir() else p
        if not p.is_file():
            raise FlexiError("paths.plan", f"no pruning plan at {p}", "run the prune stage first (`dvc repro prune`)")
        return cls.from_dict(json.loads(p.read_text()))


def make_plan(model: nn.Module | StreamedModel, scores: list[float] | None, settings: PruneSettings | None = None, *,
              importance_method: str | None = None, progress: bool = True, **overrides: Any) -> Plan:
    """Choose the pruned blocks (lowest ``scores`` or ``settings.blocks``) and a base for each (Eqs. 2-5).

    ``settings`` defaults to ``PruneSettings(**overrides)`` (e.g. ``make_plan(m, s, ratio=0.4, rank=8)``).
    ``model`` is a model in memory or a :class:`StreamedModel` (weights read one block at a time).
    """
    s = settings if settings is not None else PruneSettings(**overrides)
    ratio, blocks, rank, metric, aggregate = s.ratio, s.blocks, s.rank, s.metric, s.aggregate
    arch = model if isinstance(model, StreamedModel) else arch_of(model)
    L = arch.num_blocks
    if scores is None:
        if blocks is None:
            raise FlexiError("prune.blocks", "no importance scores and no explicit block list",
                             "run score_importance, or list prune.blocks")
        scores = [0.0] * L
    if len(scores) != L:
        raise FlexiError("paths.importance", f"has {len(scores)} scores but the model has {L} blocks",
                         "re-run score_importance for this model (`dvc repro score_importance`)")
    pruned = choose_pruned(scores, ratio, blocks)
    distances, ranks = distance_table(arch, pruned, metric=metric, rank=rank, aggregate=aggregate, svd=s.svd,
                                      progress=progress, precision=s.precision)
    types = (model.arch if isinstance(model, StreamedModel) else arch).layer_types()
    if types is not None and len(set(types)) < 2:
        types = None  # one attention type: nothing to restrict, and the plan reads as before
    base = choose_bases(distances, types if s.base_layer_type == "same" else None)
    before, per_block = model.param_counts() if isinstance(model, StreamedModel) else \
        (unique_params(model), [unique_params(b) for b in arch.blocks()])
    after = before - sum(per_block[i] for i in pruned)
    return Plan(num_blocks=L, pruned=pruned, base=base, distances=distances,
                layer_map=[base.get(p, p) for p in range(L)], params_before=before, params_after=after,
                removed_param_fraction=(before - after) / before, metric=metric, aggregate=aggregate, rank=rank,
                effective_rank=ranks, ratio=None if blocks is not None else ratio,
                importance_method=importance_method, scores=[float(s) for s in scores], layer_types=types,
                base_layer_type=None if types is None else s.base_layer_type)


def load_scores(importance: str | os.PathLike, num_blocks: int) -> tuple[list[float] | None, str | None]:
    """Scores and method from ``<importance>/importance.json``, or (None, None) when it is absent."""
    path = Path(importance) / "importance.json"
    if not path.is_file():
        return None, None
    d = json.loads(path.read_text())
    if len(d["scores"]) != num_blocks:
        raise FlexiError("paths.importance", f"{path} has {len(d['scores'])} scores but the model has "
                         f"{num_blocks} blocks", "re-run score_importance for this model (`dvc repro score_importance`)")
    return [float(s) for s in d["scores"]], str(d["method"])


def plan_model(s: PruneSettings, base_model: str | os.PathLike, importance: str | os.PathLike,
               stream: StreamSettings | None = None) -> Plan:
    """The pruning plan of the model in ``base_model`` from the scores in ``importance`` (all checks first).

    The weights are read one block at a time from the model's shards (:class:`StreamedModel`); with
    ``stream.memory_limit_gb`` set, a block larger than the cap is refused before any is read.
    """
    from flexigpt.model.arch import facts_of

    L = facts_of(base_model).num_blocks
    choose_pruned([0.0] * L, s.ratio, s.blocks)  # the block-count checks, before anything heavy
    scores, method = load_scores(importance, L)
    if scores is None and s.blocks is None:
        raise FlexiError("paths.importance", f"no importance scores at {Path(importance) / 'importance.json'}",
                         "run the score_importance stage first (`dvc repro score_importance`)")
    model = StreamedModel(Path(base_model))
    model.check_memory(stream.memory_limit_gb if stream is not None else None, tokens=0, batch_tokens=0, outer=False)
    return make_plan(model, scores, s, importance_method=method)


# -- tables ---------------------------------------------------------------------------------------
def write_distance_csvs(plan: Plan, wide: str | os.PathLike, long: str | os.PathLike) -> None:
    """``wide``: one row per pruned block, a column per block (empty = not a candidate);
    ``long``: rows ``pruned,candidate,distance`` for DVC's heatmap."""
    with atomic_file(wide) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pruned", *range(plan.num_blocks)])
        for i in plan.pruned:
            row = plan.distances[i]
            w.writerow([i, *(repr(row[j]) if j in row else "" for j in range(plan.num_blocks))])
    with atomic_file(long) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pruned", "candidate", "distance"])
        for i in plan.pruned:
            for j, d in sorted(plan.distances[i].items()):
                w.writerow([i, j, repr(d)])
