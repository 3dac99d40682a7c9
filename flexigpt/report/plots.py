"""PNG figures for the pipeline (matplotlib, Agg backend, no display needed).

A plain module of functions: each takes plain data and an output path, and writes the PNG
atomically.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flexigpt.fileio import atomic_file  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def importance_bars(scores: Sequence[float], path: str | os.PathLike, *, pruned: Sequence[int] = (),
                    method: str = "block_influence", log_scale: bool | None = None) -> None:
    """One bar per block; ``pruned`` blocks in orange. ``log_scale=None`` picks a log y axis when
    the scores are positive and span more than 20x (BI of block 0 dwarfs the rest)."""
    s = np.asarray(scores, dtype=float)
    pruned = set(pruned)
    colors = ["tab:orange" if i in pruned else "tab:blue" for i in range(len(s))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(s)), 3.6))
    ax.bar(range(len(s)), s, color=colors)
    if log_scale is None:
        pos = s[s > 0]
        log_scale = bool(len(pos) == len(s) and len(s) and pos.max() / pos.min() > 20)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xticks(range(len(s)))
    ax.set_xticklabels([str(i) for i in range(len(s))], fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel(f"{method} score (low = prunable)")
    title = f"Block importance ({method})"
    if pruned:
        title += f": {len(pruned)} lowest pruned (orange)"
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:orange"),
                           plt.Rectangle((0, 0), 1, 1, color="tab:blue")], labels=["pruned", "kept"],
                  fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def distance_heatmap(distances: dict[int, dict[int, float]], num_blocks: int, path: str | os.PathLike, *,
                     base: dict[int, int] | None = None, title: str = "Base-block distance") -> None:
    """Rows: pruned blocks; columns: all blocks (blank where not a candidate); the chosen base of
    each row is marked with a white dot."""
    rows = sorted(distances)
    grid = np.full((len(rows), num_blocks), np.nan)
    for a, i in enumerate(rows):
        for j, d in distances[i].items():
            grid[a, j] = d
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * num_blocks), max(2.5, 0.35 * len(rows) + 1.2)))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=vmin,
                   vmax=vmax if vmax > vmin else vmin + (abs(vmin) or 1.0) * 1e-6, interpolation="nearest")
    if base:
        for a, i in enumerate(rows):
            if i in base:
                ax.plot(base[i], a, "o", color="white", markersize=5, markeredgecolor="black")
    ax.set_xticks(range(num_blocks))
    ax.set_xticklabels([str(j) for j in range(num_blocks)], fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([str(i) for i in rows], fontsize=7)
    ax.set_xlabel("candidate base block")
    ax.set_ylabel("pruned block")
    ax.set_title(title + (" (dot = chosen base)" if base else ""), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="distance")
    _save(fig, path)
