"""Multi-seed studies: per-sample results, paired bootstrap comparisons, verdicts and the study table.

Each ``evaluate@<variant>`` stage writes ``metrics/eval/samples/<variant>.json``::

    {"variant": "flexigpt", "settings": {...eval settings...},
     "tasks": {"arc_easy": {"doc_ids": [...], "acc": [0/1 ...], "acc_norm": [0/1 ...]}, ...},
     "nll": {"heldout": [mean NLL per window ...], "wikitext2_2048": [...], "wikitext2_512": [...]}}

A comparison pairs two variants of the *same* experiment (same training seed, same docs, same
windows), one experiment per seed. The statistic is the 5-task average of per-doc correctness, A
minus B, in points, averaged over seeds; its 95% interval comes from a paired bootstrap that
resamples seeds and, within each task, docs (the same docs for A and B, and for every seed: the
seeds share one test set). Perplexity is compared the same way on per-window NLL differences and
reported as the ratio PPL_A / PPL_B = exp(mean ΔNLL).

numpy and the standard library only: importable without DVC, MLflow or torch.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flexigpt.errors import FlexiError

# Same as flexigpt.evaluate.lm_tasks.PAPER_TASKS (importing that module would pull in torch).
PAPER_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag")
SEED_KEYS: tuple[str, ...] = ("train.seed",)  # the swept training seed (data.seed changes the test-independent splits)
# Params that fix the plan or the evaluation: experiments that differ in one cannot be compared.
PAIRING_PREFIXES: tuple[str, ...] = ("prune", "importance", "evaluate", "data", "calibration", "heldout")
BETTER, WORSE, UNRESOLVED = "better", "worse", "not resolved at this sample size"
Z95 = 1.959963984540054  # two-sided 95% normal quantile
TARGET_POINTS = 1.0  # "docs needed" aims at a ±1 point 95% half-width of the 5-task average
# Params that only some variants' stages read: experiments that differ only in them are arms of one comparison
# (e.g. `baseline.params_matched`), reported in one table when every other variant's results are identical.
ARM_PARAMS: dict[str, tuple[str, ...]] = {"baseline": ("lora_baseline",)}
LABELS = {"dense": "Dense", "shortgpt": "ShortGPT", "lora_baseline": "ShortGPT+LoRA", "flexigpt": "FlexiGPT"}
EXTEND_LABELS = {"dense": "Base", "lora_baseline": "Base+LoRA (params matched)", "flexigpt": "FlexiGPT-extended"}
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def samples_relpath(variant: str, metrics_dir: str = "metrics") -> str:
    """Where the evaluate@<variant> stage writes its per-sample file, relative to the project root."""
    return f"{metrics_dir}/eval/samples/{variant}.json"


def rerun_fix(variant: str, experiment: str = "workspace") -> str:
    """What to do when an experiment has no (valid) per-sample file for a variant."""
    where = "`dvc repro evaluate@{v}`" if experiment == "workspace" else \
        "`dvc exp apply {e} && dvc repro evaluate@{v}` (then `dvc exp save`), or rerun it with `dvc exp run`"
    return f"rerun the evaluate@{variant} stage: " + where.format(v=variant, e=experiment)


# -- per-sample files ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSamples:
    """One task's per-doc results: doc ids and 0/1 correctness per metric (acc, acc_norm)."""

    doc_ids: np.ndarray
    metrics: dict[str, np.ndarray]

    @property
    def headline_metric(self) -> str:
        """The paper's metric: acc_norm where the task reports it, else acc (as lm_tasks.headline)."""
        return "acc_norm" if "acc_norm" in self.metrics else "acc"

    @property
    def headline(self) -> np.ndarray:
        return self.metrics[self.headline_metric]


@dataclass(frozen=True)
class Samples:
    """One variant's per-sample evaluation results in one experiment."""

    variant: str
    settings: dict[str, Any]
    tasks: dict[str, TaskSamples]
    nll: dict[str, np.ndarray]
    source: str = "workspace"  # the experiment (or file) it came from, for error messages

    def accuracy(self, task: str) -> float:
        return float(self.tasks[task].headline.mean())

    def average(self, tasks: Sequence[str] = PAPER_TASKS) -> float:
        """The 5-task average of headline accuracies, in points."""
        return 100.0 * float(np.mean([self.accuracy(t) for t in tasks]))

    def ppl(self, key: str) -> float:
        """Perplexity over the windows of one nll key: exp of the mean per-window NLL."""
        return float(math.exp(self.nll[key].mean()))


def _bad(source: str, variant: str, problem: str) -> FlexiError:
    return FlexiError(f"{source}: {samples_relpath(variant)}", problem, rerun_fix(variant, source))


def _binary(values: Any, where: str, n: int, source: str, variant: str) -> np.ndarray:
    """A 0/1 correctness list of length n (bools and 0.0/1.0 accepted)."""
    if not isinstance(values, list) or len(values) != n:
        raise _bad(source, variant, f"{where} must be a list as long as doc_ids ({n})")
    arr = np.asarray(values, dtype=float)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise _bad(source, variant, f"{where} holds values other than 0/1")
    return arr


def samples_from_dict(data: Any, *, source: str = "workspace", variant: str | None = None) -> Samples:
    """Validate a parsed per-sample file; every problem names the experiment and the stage to rerun."""
    v = variant or (data.get("variant") if isinstance(data, dict) else None) or "<variant>"
    if not isinstance(data, dict):
        raise _bad(source, v, "is not a JSON object")
    for key, typ in (("variant", str), ("settings", dict), ("tasks", dict), ("nll", dict)):
        if not isinstance(data.get(key), typ):
            raise _bad(source, v, f"has no `{key}` ({typ.__name__})")
    if variant is not None and data["variant"] != variant:
        raise _bad(source, v, f"says variant {data['variant']!r}, expected {variant!r}")
    tasks: dict[str, TaskSamples] = {}
    for task, t in data["tasks"].items():
        if not isinstance(t, dict) or not isinstance(t.get("doc_ids"), list) or "acc" not in t:
            raise _bad(source, v, f"tasks.{task} needs `doc_ids` and `acc` lists")
        ids = np.asarray(t["doc_ids"])
        if ids.size == 0:
            raise _bad(source, v, f"tasks.{task} has no docs")
        if not np.issubdtype(ids.dtype, np.integer) or len(set(t["doc_ids"])) != len(t["doc_ids"]):
            raise _bad(source, v, f"tasks.{task}.doc_ids must be distinct integers")
        metrics = {m: _binary(t[m], f"tasks.{task}.{m}", ids.size, source, v) for m in ("acc", "acc_norm") if m in t}
        tasks[task] = TaskSamples(ids.astype(np.int64), metrics)
    nll: dict[str, np.ndarray] = {}
    for key, vals in data["nll"].items():
        arr = np.asarray(vals, dtype=float) if isinstance(vals, list) else np.empty(0)
        if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
            raise _bad(source, v, f"nll.{key} must be a non-empty list of finite numbers")
        nll[key] = arr
    return Samples(data["variant"], data["settings"], tasks, nll, source)


def load_samples(path: str | Path, *, experiment: str = "workspace", variant: str | None = None) -> Samples:
    """Read and validate one per-sample file (``metrics/eval/samples/<variant>.json``)."""
    path = Path(path)
    v = variant or path.stem
    if not path.is_file():
        raise FlexiError(f"{experiment}: {path}", "per-sample file is missing", rerun_fix(v, experiment))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(experiment, v, f"is not valid JSON ({e})") from None
    return samples_from_dict(data, source=experiment, variant=variant)


# -- paired bootstrap ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% bootstrap interval and the verdict it supports."""

    value: float
    lo: float
    hi: float
    verdict: str


@dataclass(frozen=True)
class Comparison:
    """A minus B over seeds: 5-task average and per task in points, PPL as ratios A/B."""

    a: str
    b: str
    n_seeds: int
    n_docs: dict[str, int]
    average: Estimate                # Δ 5-task average, points
    tasks: dict[str, Estimate]       # Δ per task, points
    ppl_ratio: dict[str, Estimate]   # PPL_A / PPL_B per nll key; < 1 means A is better
    disagreement: dict[str, float]   # q_t: fraction of (seed, doc) where A and B differ in correctness
    half_width: float                # normal-approximation 95% half-width of the average now, points
    docs_needed: int                 # docs per task for a ±TARGET_POINTS half-width
    n_windows: dict[str, int] = field(default_factory=dict)


def verdict(lo: float, hi: float, lower_is_better: bool = False) -> str:
    """better / worse when the 95% interval excludes 0 (in the good / bad direction), else unresolved."""
    if lo > 0:
        return WORSE if lower_is_better else BETTER
    if hi < 0:
        return BETTER if lower_is_better else WORSE
    return UNRESOLVED


def _settings_diff(x: Mapping[str, Any], y: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first dotted key where two settings dicts differ, or None."""
    for k in sorted(set(x) | set(y), key=str):
        if k not in x or k not in y:
            return f"{prefix}{k}"
        if isinstance(x[k], Mapping) and isinstance(y[k], Mapping):
            sub = _settings_diff(x[k], y[k], f"{prefix}{k}.")
            if sub:
                return sub
        elif x[k] != y[k]:
            return f"{prefix}{k}"
    return None


def _get(d: Mapping[str, Any], dotted: str) -> Any:
    """A nested value by dotted key, or '<absent>'."""
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return "<absent>"
        d = d[part]
    return d


def check_pairs(a: Sequence[Samples], b: Sequence[Samples], tasks: Sequence[str]) -> None:
    """Refuse pairs that were not evaluated on the same settings, docs and windows."""
    if not a or len(a) != len(b):
        raise FlexiError("seeds", f"{len(a)} seeds of A vs {len(b)} of B", "pass one Samples per seed for both")
    for sa, sb in zip(a, b):
        key = _settings_diff(sa.settings, sb.settings)
        if key is not None:
            raise FlexiError(f"settings.{key}", f"{sa.variant} ({sa.source}) has {_get(sa.settings, key)!r}, "
                             f"{sb.variant} ({sb.source}) has {_get(sb.settings, key)!r}",
                             "compare variants evaluated with the same evaluate.* params (rerun one evaluate stage)")
        for t in tasks:
            if t not in sa.tasks or t not in sb.tasks:
                raise FlexiError(f"tasks.{t}", f"missing from {sa.variant if t not in sa.tasks else sb.variant} "
                                 f"({sa.source})", "evaluate every compared task (evaluate.tasks)")
            if not np.array_equal(sa.tasks[t].doc_ids, sb.tasks[t].doc_ids):
                raise FlexiError(f"tasks.{t}.doc_ids", f"{sa.variant} and {sb.variant} ({sa.source}) were scored on "
                                 "different docs", "rerun both evaluate stages with the same evaluate.limit")
            if sa.tasks[t].headline_metric != sb.tasks[t].headline_metric:
                raise FlexiError(f"tasks.{t}", "one variant reports acc_norm, the other not",
                                 "rerun both evaluate stages with the same code")
        for k in set(sa.nll) & set(sb.nll):
            if sa.nll[k].size != sb.nll[k].size:
                raise FlexiError(f"nll.{k}", f"{sa.nll[k].size} windows vs {sb.nll[k].size} ({sa.source})",
                                 "rerun both evaluate stages with the same evaluate.* / heldout.* params")
    for t in tasks:  # the seeds share one test set: the docs bootstrap resamples it once per replicate
        if any(not np.array_equal(s.tasks[t].doc_ids, a[0].tasks[t].doc_ids) for s in a):
            raise FlexiError(f"tasks.{t}.doc_ids", "seeds were scored on different docs",
                             "compare experiments with the same evaluate.* params")


def _boot_mean(rng: np.random.Generator, diffs: np.ndarray, seed_w: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """Bootstrap replicates of the seed-weighted mean of (seeds x items) diffs, items resampled.

    ``seed_w`` (n_boot x seeds) are the seed resampling weights (summing to 1 per replicate); the
    same item indices serve every seed of a replicate. Multinomial counts = indices drawn with
    replacement; drawn in chunks so a 2000-doc task does not allocate n_boot x 2000 at once.
    """
    n_boot, n = seed_w.shape[0], diffs.shape[1]
    out = np.empty(n_boot)
    for i in range(0, n_boot, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - i))
        per_seed = counts @ diffs.T / n                      # (chunk x seeds): each seed's resampled mean
        out[i:i + len(counts)] = (per_seed * seed_w[i:i + len(counts)]).sum(axis=1)
    return out


def _interval(reps: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(lo), float(hi)


def docs_needed(q: Mapping[str, float], delta: Mapping[str, float], target: float = TARGET_POINTS) -> int:
    """Docs per task n with 1.96 * sqrt(sum_t (q_t - δ_t²) / n) / T * 100 <= target (T = number of tasks).

    q_t - δ_t² is the variance of a per-doc difference in {-1, 0, 1} with mean δ_t and P(≠ 0) = q_t.
    """
    var = sum(max(q[t] - delta[t] ** 2, 0.0) for t in q)
    return math.ceil((Z95 * 100 / len(q) / target) ** 2 * var) if var > 0 else 0


def half_width(q: Mapping[str, float], delta: Mapping[str, float], n_docs: Mapping[str, int]) -> float:
    """The normal-approximation 95% half-width of the T-task average difference at n_t docs, points."""
    var = sum(max(q[t] - delta[t] ** 2, 0.0) / n_docs[t] for t in q)
    return Z95 * math.sqrt(var) / len(q) * 100


def compare(a: list[Samples], b: list[Samples], *, tasks: Sequence[str] = PAPER_TASKS, n_boot: int = 10000,
            seed: int = 0) -> Comparison:
    """A minus B, paired by seed (``a[s]``, ``b[s]``) and by doc / window, with bootstrap intervals."""
    tasks = list(tasks)
    check_pairs(a, b, tasks)
    rng = np.random.default_rng(seed)  # one generator, drawn in a fixed order: the same inputs give the same bytes
    n_seeds = len(a)
    seed_draws = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot) / n_seeds
    diffs = {t: np.stack([sa.tasks[t].headline - sb.tasks[t].headline for sa, sb in zip(a, b)]) for t in tasks}
    task_reps = {t: 100 * _boot_mean(rng, d, seed_draws) for t, d in diffs.items()}
    avg_reps = np.mean([task_reps[t] for t in tasks], axis=0)  # same replicate draws for every task
    point = {t: 100 * float(d.mean()) for t, d in diffs.items()}
    avg = float(np.mean([point[t] for t in tasks]))
    task_est = {t: Estimate(point[t], *_interval(task_reps[t]), verdict(*_interval(task_reps[t]))) for t in tasks}
    ppl: dict[str, Estimate] = {}
    for key in sorted(set.intersection(*(set(s.nll) for s in [*a, *b]))):
        d = np.stack([sa.nll[key] - sb.nll[key] for sa, sb in zip(a, b)])
        lo, hi = _interval(_boot_mean(rng, d, seed_draws))
        ppl[key] = Estimate(math.exp(d.mean()), math.exp(lo), math.exp(hi), verdict(lo, hi, lower_is_better=True))
    q = {t: float((d != 0).mean()) for t, d in diffs.items()}  # pooled over seeds and docs
    delta = {t: float(d.mean()) for t, d in diffs.items()}
    n_docs = {t: int(diffs[t].shape[1]) for t in tasks}
    lo, hi = _interval(avg_reps)
    return Comparison(a[0].variant, b[0].variant, n_seeds, n_docs, Estimate(avg, lo, hi, verdict(lo, hi)), task_est,
                      ppl, q, half_width(q, delta, n_docs), docs_needed(q, delta),
                      {k: int(a[0].nll[k].size) for k in ppl})


# -- grouping experiments ------------------------------------------------------------------------

@dataclass
class Group:
    """Experiments with identical params except the seed: one recipe, several seeds."""

    params: dict[str, Any]                       # the shared flat params (seed keys removed)
    seeds: list[Any]                             # seed values, sorted
    experiments: list[str]                       # experiment names, in seed order
    samples: dict[str, list[Samples]]            # variant -> one Samples per seed, in seed order
    label: str = "all experiments"               # what sets it apart from the other groups
    notes: list[str] = field(default_factory=list)


def seed_of(params: Mapping[str, Any]) -> Any:
    """An experiment's seed: the first seed key its params have (``train.seed`` overrides ``seed``)."""
    return next((params[k] for k in SEED_KEYS if k in params), None)


def _pairing_param(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in PAIRING_PREFIXES)


def collect(exps: list[dict]) -> list[Group]:
    """Group experiments by params minus the seed keys; refuse experiments that differ in plan/eval params.

    Each exp is ``{"name", "rev", "params": {flat params}, "samples": {variant: Samples}}``.
    Groups may differ in recipe params (train.*, adapters.*, norm.*, ...): that is what a study
    sweeps. A plan or evaluation param (``PAIRING_PREFIXES``) must be the same for every experiment.
    """
    if not exps:
        raise FlexiError("experiments", "none to report", "run a study first: `flexigpt study seeds`, then "
                         "`dvc queue start -j 1`")
    first = exps[0]
    for e in exps[1:]:  # one plan and one eval protocol for all: else no pair is like for like
        for k in sorted(set(first["params"]) | set(e["params"])):
            if _pairing_param(k) and first["params"].get(k, "<absent>") != e["params"].get(k, "<absent>"):
                raise FlexiError(k, f"experiment {first['name']} has {first['params'].get(k, '<absent>')!r}, "
                                 f"{e['name']} has {e['params'].get(k, '<absent>')!r}: their results cannot be paired",
                                 "report them separately (`flexigpt report --exp NAME ...`), or rerun one with "
                                 f"`-S {k}=...`")
    by_key: dict[str, list[dict]] = {}
    for e in exps:
        rest = {k: v for k, v in e["params"].items() if k not in SEED_KEYS}
        by_key.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(e)
    groups = _merge_arms([_group(members) for members in by_key.values()])
    _label(groups)
    return groups


def _arm_prefix(key: str) -> str | None:
    return next((p for p in ARM_PARAMS if key == p or key.startswith(p + ".")), None)


def _same_samples(a: Samples, b: Samples) -> bool:
    """Identical results: the same docs, correctness and NLLs (as when DVC restored one stage for both)."""
    return (a.tasks.keys() == b.tasks.keys() and a.nll.keys() == b.nll.keys()
            and all(np.array_equal(a.tasks[t].doc_ids, b.tasks[t].doc_ids)
                    and a.tasks[t].metrics.keys() == b.tasks[t].metrics.keys()
                    and all(np.array_equal(a.tasks[t].metrics[m], b.tasks[t].metrics[m]) for m in a.tasks[t].metrics)
                    for t in a.tasks)
            and all(np.array_equal(a.nll[k], b.nll[k]) for k in a.nll))


def _merge_arms(groups: list[Group]) -> list[Group]:
    """Groups that differ only in arm params (``ARM_PARAMS``) and share their seeds become one group: the
    variants those params touch appear once per arm (``lora_baseline[baseline.params_matched=True]``), the
    others once. Merged only when every untouched variant's results are identical across the arms; else the
    groups stay apart, with a note saying which variant differs."""
    def rest(g: Group) -> str:
        return json.dumps({k: v for k, v in g.params.items() if not _arm_prefix(k)}, sort_keys=True, default=str)

    by_rest: dict[str, list[Group]] = {}
    for g in groups:
        by_rest.setdefault(rest(g) + json.dumps(g.seeds, default=str), []).append(g)
    out: list[Group] = []
    for arms in by_rest.values():
        if len(arms) < 2:
            out += arms
            continue
        keys = sorted({k for g in arms for k in g.params if _arm_prefix(k)
                       and len({json.dumps(h.params.get(k), default=str) for h in arms}) > 1})
        touched = {v for k in keys for v in ARM_PARAMS[_arm_prefix(k)]}  # type: ignore[index]
        first = arms[0]
        differ = [v for v in first.samples if v not in touched for g in arms[1:]
                  if v not in g.samples or not all(map(_same_samples, first.samples[v], g.samples[v]))]
        if differ:
            for g in arms:
                g.notes.append(f"not merged with its other arms ({', '.join(keys)}): {differ[0]} differs between them")
            out += arms
            continue
        samples: dict[str, list[Samples]] = {}
        for v, per_seed in first.samples.items():
            if v not in touched:
                samples[v] = per_seed
                continue
            for g in arms:
                samples[f"{v}[{', '.join(f'{k}={g.params.get(k)}' for k in keys)}]"] = g.samples[v]
        params = {k: v for k, v in first.params.items() if k not in keys}
        notes = [n for g in arms for n in g.notes]
        notes.append(f"{', '.join(keys)} arms in one table: the other variants' results are identical across them, "
                     "document by document")
        out.append(Group(params, first.seeds, [e for g in arms for e in g.experiments], samples, notes=notes))
    return out


def _group(members: list[dict]) -> Group:
    """One group: one experiment per seed (a workspace duplicating a named experiment's seed is dropped)."""
    notes: list[str] = []
    per_seed: dict[str, dict] = {}
    for e in members:
        s = json.dumps(seed_of(e["params"]), default=str)
        if s in per_seed:
            keep, drop = (per_seed[s], e) if e["name"] == "workspace" else (e, per_seed[s])
            if drop["name"] != "workspace":
                raise FlexiError("experiments", f"{keep['name']} and {drop['name']} have the same params and seed "
                                 f"{seed_of(e['params'])!r}", "pass one of them with `--exp NAME`")
            notes.append(f"workspace skipped: same params and seed as {keep['name']}")
            e = keep
        per_seed[s] = e
    ordered = [per_seed[k] for k in sorted(per_seed, key=lambda k: (str(type(json.loads(k))), json.loads(k)))]
    variants = [v for v in ordered[0]["samples"] if all(v in e["samples"] for e in ordered)]
    rest = {k: v for k, v in ordered[0]["params"].items() if k not in SEED_KEYS}
    return Group(rest, [seed_of(e["params"]) for e in ordered], [e["name"] for e in ordered],
                 {v: [e["samples"][v] for e in ordered] for v in variants}, notes=notes)


def _label(groups: list[Group]) -> None:
    """Name each group by the params that differ between groups (e.g. ``train.token_budget=98304``)."""
    if len(groups) < 2:
        return
    keys = sorted({k for g in groups for k in g.params if len({json.dumps(h.params.get(k), default=str)
                                                                 for h in groups}) > 1})
    for g in groups:
        g.label = ", ".join(f"{k}={g.params.get(k, '<absent>')}" for k in keys)


# -- the markdown table --------------------------------------------------------------------------

def _mean_std(xs: Sequence[float], digits: int = 1) -> str:
    m = float(np.mean(xs))
    return f"{m:.{digits}f} ± {float(np.std(xs, ddof=1)):.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def _ci(e: Estimate, digits: int = 1, signed: bool = True) -> str:
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(e.value)} [{f.format(e.lo)}, {f.format(e.hi)}]"


def _ppl_name(key: str) -> str:
    """nll key -> column name: heldout -> heldout PPL, wikitext2_2048 -> WikiText-2 PPL (2048)."""
    if key.startswith("wikitext2_"):
        return f"WikiText-2 PPL ({key.split('_', 1)[1]})"
    return f"{key} PPL"


def label(variant: str, mode: str = "prune") -> str:
    """Display name; an arm ``lora_baseline[baseline.params_matched=True]`` -> ``ShortGPT+LoRA [params_matched=True]``."""
    base, _, arm = variant.partition("[")
    name = (EXTEND_LABELS if mode == "extend" else LABELS).get(base, base)
    if not arm:
        return name
    return f"{name} [" + ", ".join(a.strip().split(".", 1)[-1] for a in arm.rstrip("]").split(",")) + "]"


def group_table(g: Group, *, n_boot: int = 10000, seed: int = 0) -> str:
    """Per-variant mean ± std over seeds, then FlexiGPT vs each baseline with intervals and verdicts."""
    mode = str(g.params.get("mode", "prune"))
    first = next(iter(g.samples.values()))[0]
    tasks = [t for t in first.tasks]
    paper = [t for t in PAPER_TASKS if t in first.tasks]
    nll_keys = sorted(first.nll, key=lambda k: (k != "heldout", k))
    n_docs = ", ".join(f"{t} {first.tasks[t].doc_ids.size}" for t in tasks)
    lines = [f"{len(g.seeds)} seed(s) {g.seeds} ({', '.join(g.experiments)}); docs per task: {n_docs}; "
             f"PPL windows: {', '.join(f'{k} {first.nll[k].size}' for k in nll_keys)}", ""]
    lines += ["| model | 5-task avg | " + " | ".join(tasks) + " | " + " | ".join(map(_ppl_name, nll_keys)) + " |",
              "|---" * (2 + len(tasks) + len(nll_keys)) + "|"]
    for v, per_seed in g.samples.items():
        cells = [_mean_std([s.average(paper) for s in per_seed])]
        cells += [_mean_std([100 * s.accuracy(t) for s in per_seed]) for t in tasks]
        cells += [_mean_std([s.ppl(k) for s in per_seed], 2) for k in nll_keys]
        lines.append(f"| {label(v, mode)} | " + " | ".join(cells) + " |")
    lines.append("\nAccuracy in points (headline metric: acc_norm where reported, else acc), mean ± std over seeds.")
    if "flexigpt" not in g.samples or len(g.samples) < 2:
        return "\n".join(lines)
    baselines = [b for b in g.samples if b != "flexigpt"]
    comps = [compare(g.samples["flexigpt"], g.samples[b], tasks=paper, n_boot=n_boot, seed=seed) for b in baselines]
    lines += ["", f"| {label('flexigpt', mode)} vs | Δ 5-task avg [95% CI] | verdict | ±half-width now | "
              f"docs/task for ±{TARGET_POINTS:g} pt | " + " | ".join(f"{_ppl_name(k)} ratio [95% CI]"
                                                                    for k in nll_keys) + " |",
              "|---" * (5 + len(nll_keys)) + "|"]
    for b, c in zip(baselines, comps):
        ppl = [f"{_ci(c.ppl_ratio[k], 3, False)}{_short(c.ppl_ratio[k].verdict)}" if k in c.ppl_ratio else "—"
               for k in nll_keys]
        lines.append(f"| {label(b, mode)} | {_ci(c.average)} | {c.average.verdict} | {c.half_width:.1f} | "
                     f"{f'{c.docs_needed:,}' if c.docs_needed else '—'} | " + " | ".join(ppl) + " |")
    lines += ["", "| Δ per task vs | " + " | ".join(paper) + " |", "|---" * (1 + len(paper)) + "|"]
    for b, c in zip(baselines, comps):
        lines.append(f"| {label(b, mode)} | " + " | ".join(f"{_ci(c.tasks[t])}{_short(c.tasks[t].verdict)}"
                                                           for t in paper) + " |")
    lines.append(f"\nΔ = {label('flexigpt', mode)} minus the baseline, points, paired by seed and doc; 95% CI from a "
                 f"paired bootstrap over seeds and docs ({n_boot:,} replicates); PPL ratio = exp(mean ΔNLL), "
                 "< 1 is better. Verdict: better / worse when the interval excludes 0, else not resolved at this "
                 f"sample size. Half-width and docs/task: normal approximation from the per-task disagreement rate "
                 "(pooled over seeds; — = A and B agree on every doc).")
    return "\n".join(lines)


def _short(v: str) -> str:
    """A verdict for a table cell: ' better', ' worse' or ' (not resolved)'."""
    return {BETTER: " better", WORSE: " worse"}.get(v, " (not resolved)")


def study_table(groups: list[Group], *, n_boot: int = 10000, seed: int = 0) -> str:
    """The whole study as markdown: one section per group (recipe / budget), tables and verdicts."""
    parts = []
    for g in groups:
        parts.append(f"### {g.label}\n\n" + group_table(g, n_boot=n_boot, seed=seed)
                     + "".join(f"\n\nNote: {n}" for n in g.notes))
    return "\n\n".join(parts) + "\n"


def replace_block(document: str, block: str) -> str:
    """``document`` with the text between the study markers replaced (markers appended when absent)."""
    body = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in document and END in document.split(BEGIN, 1)[1]:
        head, rest = document.split(BEGIN, 1)
        return head + body + rest.split(END, 1)[1]
    if not document:
        return body + "\n"
    return document.rstrip("\n") + "\n\n" + body + "\n"  # appended after one blank line
