"""The comparison table and chart across evaluated variants (what users read)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from flexigpt.errors import FlexiError
from flexigpt.evaluate.lm_tasks import PAPER_TASKS, TASKS, headline
from flexigpt.fileio import atomic_file

PPL_COLS = ("heldout_ppl", "wikitext2_ppl_2048", "wikitext2_ppl_512", "lmeval_wikitext_word_ppl")


def load_results(metrics_dir: str | os.PathLike, variants: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(evaluation record, training metrics) per variant, from ``<metrics_dir>/eval/<v>.json`` and
    ``<metrics_dir>/train_<v>.json`` (the latter only for trained variants)."""
    results, training = {}, {}
    for v in variants:
        f = Path(metrics_dir) / "eval" / f"{v}.json"
        if not f.is_file():
            raise FlexiError("evaluate.variants", f"no evaluation of {v!r} at {f}", f"run `dvc repro evaluate@{v}`")
        results[v] = json.loads(f.read_text())
        t = Path(metrics_dir) / f"train_{v}.json"
        if t.is_file():
            training[v] = json.loads(t.read_text())
    return results, training


def summary(df: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """The headline columns per variant (what the compare stage reports as metrics)."""
    keys = ("heldout_ppl", "wikitext2_ppl_512", "paper_avg", "retained_pct", "stored_pct_of_dense")
    return {v: {k: (float(df.loc[v, k]) if k in df.columns and pd.notna(df.loc[v, k]) else None) for k in keys}
            for v in df.index}


def comparison_table(results: dict[str, dict[str, Any]], dense: str = "dense",
                     training: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row per variant: PPLs, headline accuracy per task, paper average, retained %, costs.

    ``training`` (variant -> train metrics) adds the trained variants' trainable parameters and
    tokens. Wall-clock figures are not results (they differ run to run): they live in the stages'
    run records, ``metrics/timing/*.json``. Variants marked ``applicable: false`` (ShortGPT in extend mode) are left out.
    """
    rows = []
    ref = results.get(dense)
    training = training or {}
    for name, r in results.items():
        if r.get("applicable") is False:
            continue
        row: dict[str, Any] = {"variant": name, "label": r.get("label", name)}
        for c in PPL_COLS:
            if r.get(c) is not None:
                row[c] = r[c]
        for t in TASKS:
            if t in r.get("tasks", {}):
                row[t] = 100 * headline(r["tasks"][t], t)
                row[f"{t}_stderr"] = 100 * r["tasks"][t].get("acc_norm_stderr" if "acc_norm" in r["tasks"][t]
                                                             and t != "winogrande" else "acc_stderr", math.nan)
        if r.get("paper_average") is not None:
            row["paper_avg"] = 100 * r["paper_average"]
            if ref and ref.get("paper_average"):
                row["retained_pct"] = 100 * r["paper_average"] / ref["paper_average"]
        c = r.get("cost", {})
        row.update(stored_params=c.get("stored_params"), block_executions=c.get("block_executions"),
                   flops_per_token=c.get("flops_per_token"))
        if ref and c.get("stored_params") and ref.get("cost", {}).get("stored_params"):
            row["stored_pct_of_dense"] = 100 * c["stored_params"] / ref["cost"]["stored_params"]
        t = training.get(name, {})
        row.update(trainable_params=t.get("trainable_params"), train_tokens=t.get("tokens_seen"))
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def to_markdown(df: pd.DataFrame, protocols: dict[str, str]) -> str:
    """Markdown table plus the protocol of every PPL column."""
    show = [c for c in df.columns if not c.endswith("_stderr")]
    fmt = df[show].copy()
    for c in show:
        if c in ("stored_params", "flops_per_token", "trainable_params"):
            fmt[c] = fmt[c].map(lambda v: f"{v / 1e6:.1f}M" if pd.notna(v) else "")
        elif c in ("block_executions", "train_tokens", "train_s"):
            fmt[c] = fmt[c].map(lambda v: f"{v:.0f}" if pd.notna(v) else "")
        elif fmt[c].dtype.kind == "f":
            fmt[c] = fmt[c].map(lambda v: f"{v:.2f}" if pd.notna(v) else "")
    head = "| variant | " + " | ".join(show) + " |\n|---|" + "---|" * len(show) + "\n"
    body = "".join(f"| {i} | " + " | ".join(str(v) for v in r) + " |\n" for i, r in fmt.iterrows())
    notes = "".join(f"- `{k}`: {v}\n" for k, v in protocols.items())
    tasks = ", ".join(PAPER_TASKS)
    return (head + body + f"\nAccuracies are % (acc_norm, acc for WinoGrande); `paper_avg` = mean over {tasks}; "
            "`retained_pct` = paper_avg / dense paper_avg.\n\nPerplexity protocols:\n" + notes)


def plot_comparison(df: pd.DataFrame, png: str) -> None:
    """Two bar panels: perplexity (log scale) and 5-task average accuracy per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ppl_cols = [c for c in PPL_COLS[:3] if c in df.columns]
    df[ppl_cols].plot.bar(ax=axes[0], logy=True, rot=20)
    axes[0].set_title("Perplexity (lower is better, log scale)")
    if "paper_avg" in df.columns:
        err = None
        df["paper_avg"].plot.bar(ax=axes[1], rot=20, color="tab:green", yerr=err)
        axes[1].axhline(35, ls="--", c="gray", lw=1)
        axes[1].text(-0.4, 35.5, "chance ≈ 35", color="gray", fontsize=8)
        axes[1].set_title("5-task zero-shot average, % (higher is better)")
    fig.tight_layout()
    with atomic_file(png) as tmp:  # a crash never leaves a half-written picture
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
