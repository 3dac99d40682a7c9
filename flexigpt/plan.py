"""Pruning plan: which blocks to prune, and which unpruned block each one shares weights with.

Step (a), the pruned set: the ``n`` blocks with the lowest importance score, with
``n = round_half_up(ratio * L)`` (ratio 0.3 on SmolLM2's 30 blocks gives 9), or an explicit list.
The parameter saving is reported ShortGPT-style: the pruned blocks' own parameters over the
model's unique parameters (tied embeddings counted once).

Step (b), the bases (paper Eqs. 2-5). For a pruned block ``i`` and each unpruned candidate ``j``,
per weight matrix ``W`` (out x in) with rank-``r`` truncations ``Ŵ = U_r S_r V_rᵀ``::

    d(W_i, W_j) = || D - SVD_r(D) ||_F,   D = Ŵ_i - Ŵ_j   (rank <= 2r)
                = sqrt( sum_{k > r} σ_k(D)² )

computed in closed form from thin factors: with ``P = [U_i S_i, -U_j S_j]`` (m x 2r) and
``Q = [V_i, V_j]`` (n x 2r) we have ``D = P Qᵀ``; for any ``L`` with ``QᵀQ = L Lᵀ``, ``D`` and
``P L`` have the same singular values, so ``σ(D)² = eig(Lᵀ (PᵀP) L)``, a 2r x 2r symmetric problem
assembled from r x r products of the factors. Each weight's truncated SVD is taken once
(``prune.svd``); no full-size difference is ever decomposed for this metric. When both ``V`` have
orthonormal columns (as the truncated SVDs here give), ``L = [[I, 0], [Cᵀ, chol(I - CᵀC)]]`` with
``C = V_iᵀV_j`` needs only an r x r Cholesky; otherwise (or where ``I - CᵀC`` is singular) ``L``
is the Cholesky factor of the full 2r x 2r Gram, and Householder QR where that is singular too.
Matrices of one candidate are compared with all pruned blocks in one batched call.
``prune.precision`` sets the dtype of the Grams and eigenproblems: float64 (default) or float32
(about 2x faster on CPU and the natural choice on GPUs; ``benchmarks/bench_importance.py`` reports
its deviation from float64 and whether the chosen bases change).

Per-matrix distances are combined into one block distance by ``aggregate``:

* ``sum_sq`` (default): ``sqrt(sum_W d_W²)``, the Frobenius norm of all matrices' residuals
  taken together (large matrices weigh more, as in the paper's "uniform" treatment);
* ``sum``: ``sum_W d_W``;
* ``mean_rel``: ``mean_W d_W / ||W_i||_F``, scale-free, every matrix weighs the same.

Then ``j* = argmin_j d(i, j)`` over unpruned ``j`` (ties: the lower index). Ablation ``metric`` s:
``lowrank`` (the paper's, above), ``no_truncation`` (``D = W_i - W_j`` with full weights,
``d = ||D - SVD_r(D)||_F`` from the eigenvalues of ``DᵀD`` in float64), ``frobenius``
(``||W_i - W_j||_F``) and ``nearest`` (``d = |i - j|``, the nearest unpruned neighbour).

Rank clamping: a matrix with ``min(m, n) < r`` uses ``r_W = min(m, n)`` and a warning is logged.
Its truncation is then exact and ``rank(D) <= r_W``, so it contributes ``d_W = 0`` to ``lowrank``
and ``no_truncation``: a rank-``r`` adapter can represent any difference of that matrix.
``r <= 0`` is an error.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ModelAdapter, get_adapter
from .errors import FlexiError
from .fileio import atomic_file, write_json

log = logging.getLogger(__name__)

METRICS = ("lowrank", "no_truncation", "frobenius", "nearest")
AGGREGATES = ("sum_sq", "sum", "mean_rel")
SVD_METHODS = ("gram", "exact", "randomized")
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
ORTHONORMAL_TOL = 1e-5      # max |VᵀV - I| for the r x r Cholesky path of lowrank_residual
RANDOMIZED_OVERSAMPLE = 16  # extra sketch columns for svd="randomized"
RANDOMIZED_NITER = 4        # power iterations for svd="randomized"
T = TypeVar("T")
R = TypeVar("R")


# -- validation ---------------------------------------------------------------------------------
def check_choice(value: Any, choices: tuple[str, ...], param: str) -> str:
    if value not in choices:
        raise FlexiError(param, f"unknown value {value!r}", f"use one of: {', '.join(choices)}")
    return value


def check_rank(rank: Any, param: str = "prune.rank") -> int:
    """The truncation rank ``r``: a whole number >= 1 (values above min(m, n) are clamped later)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or (isinstance(rank, float)
                                                                       and not rank.is_integer()):
        raise FlexiError(param, f"must be a whole number, got {rank!r}", f"set `{param}` to e.g. 32")
    if rank <= 0:
        raise FlexiError(param, f"must be >= 1, got {rank}", f"set `{param}` to a positive rank, e.g. 32")
    return int(rank)


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


# -- parameter counts ---------------------------------------------------------------------------
def unique_param_count(module: nn.Module) -> int:
    """Parameters of ``module``, counting tied/shared tensors once."""
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


def block_param_counts(adapter: ModelAdapter) -> list[int]:
    return [unique_param_count(b) for b in adapter.blocks()]


# -- distances ----------------------------------------------------------------------------------
def effective_rank(rank: int, shape: tuple[int, ...], name: str = "", warned: set[str] | None = None) -> int:
    """``min(rank, m, n)``; logs one warning per matrix name when it clamps."""
    r = min(rank, shape[0], shape[1])
    if r < rank and (warned is None or name not in warned):
        log.warning("rank %d exceeds min(m, n) = %d of %s %s: clamped to %d (its truncation is exact and it "
                    "adds 0 to the lowrank/no_truncation distances)", rank, r, name or "matrix", tuple(shape), r)
        if warned is not None:
            warned.add(name)
    return r


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def truncated_svd(w: torch.Tensor, r: int, method: str = "gram", precision: torch.dtype = torch.float64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors ``(U_r S_r, V_r)`` of ``w`` (m x n), so that ``Ŵ = (U_r S_r) V_rᵀ``.

    * ``gram`` (default): eigendecomposition (in ``precision``) of the smaller Gram matrix (``WᵀW`` when
      m >= n, else ``WWᵀ``); the same factors as the SVD up to rounding, about 2x faster on CPU than
      LAPACK's float32 SVD for these shapes. ``σ = sqrt(λ)``, and the other side is ``W V_r``
      (or ``Wᵀ U_r / σ``).
    * ``exact``: ``torch.linalg.svd`` (LAPACK gesdd).
    * ``randomized``: ``torch.svd_lowrank`` (Halko et al.) with ``r + 16`` sketch columns and 4
      power iterations; approximate, for very large matrices.
    """
    dt = _work_dtype(w)
    w = w.detach().to(dt)
    m, n = w.shape
    r = min(r, m, n)
    if method == "randomized" and r + RANDOMIZED_OVERSAMPLE < min(m, n):
        u, s, v = _svd_lowrank_seeded(w, r + RANDOMIZED_OVERSAMPLE, RANDOMIZED_NITER)
        return u[:, :r] * s[:r], v[:, :r]
    if method == "gram":
        w64 = w.to(precision)
        if m >= n:
            lam, vecs = torch.linalg.eigh(w64.mT @ w64)        # ascending
            v = vecs[:, -r:].flip(-1)
            return (w64 @ v).to(dt), v.to(dt)
        lam, vecs = torch.linalg.eigh(w64 @ w64.mT)
        u, s = vecs[:, -r:].flip(-1), lam[-r:].flip(-1).clamp_min(0).sqrt()
        v = (w64.mT @ u) / s.clamp_min(torch.finfo(precision).tiny)
        return (u * s).to(dt), v.to(dt)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] * s[:r], vh[:r].mT


def _svd_lowrank_seeded(w: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al.'s randomized SVD (what ``torch.svd_lowrank`` computes) with a private, fixed-seed sketch.

    ``torch.svd_lowrank`` draws its sketch from torch's global generator, which the worker threads of
    :func:`parallel_map` share: the result would depend on thread scheduling and on earlier draws.
    A generator of our own makes the plan a pure function of the weights.
    """
    g = torch.Generator(device=w.device).manual_seed(0)
    y = w @ torch.randn(w.shape[1], q, generator=g, dtype=w.dtype, device=w.device)
    basis = torch.linalg.qr(y).Q
    for _ in range(niter):  # power iterations sharpen the basis on slowly decaying spectra
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.mT @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ w, full_matrices=False)
    return basis @ u, s, vh.mT


def _tail_energy(core: torch.Tensor, r: int, precision: torch.dtype = torch.float64) -> torch.Tensor:
    """``sum_{k>r} σ_k(core)²`` from the eigenvalues of ``core coreᵀ`` (in ``precision``, ascending)."""
    c = core.to(precision)
    g = c @ c.mT if c.shape[-2] <= c.shape[-1] else c.mT @ c
    lam = torch.linalg.eigvalsh(g).clamp_min(0)
    k = lam.shape[-1] - r  # all but the r largest
    return lam[..., :max(k, 0)].sum(-1)


def self_grams(us: torch.Tensor, v: torch.Tensor, precision: torch.dtype = torch.float64
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(usᵀus, vᵀv)`` in ``precision``: the diagonal blocks of the Grams in :func:`lowrank_residual`."""
    return (us.mT @ us).to(precision), (v.mT @ v).to(precision)


def _is_orthonormal(gram: torch.Tensor) -> bool:
    """Whether ``gram = VᵀV`` is the identity within ``ORTHONORMAL_TOL`` (every batch element)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return bool((gram - eye).abs().amax() <= ORTHONORMAL_TOL)


def _core_orthonormal(a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Lᵀ [[a, b], [bᵀ, e]] L`` for ``L = [[I, 0], [cᵀ, l]]``, ``l lᵀ = I - cᵀc``, and the failure mask.

    ``L Lᵀ = [[I, c], [cᵀ, I]]``, the Gram of ``[V_i, V_j]`` with orthonormal ``V`` and ``c = V_iᵀV_j``.
    With ``m = b + c e`` the product is ``[[a + m cᵀ + c bᵀ, m l], [lᵀ mᵀ, lᵀ e l]]``: six r x r
    products instead of two 2r x 2r ones. ``I - cᵀc`` is singular when the two column spaces share a
    direction; those elements are flagged for the general path.
    """
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    l, info = torch.linalg.cholesky_ex(eye - c.mT @ c)
    m = b + c @ e
    top = torch.cat([a + m @ c.mT + c @ b.mT, m @ l], -1)
    bottom = torch.cat([l.mT @ m.mT, l.mT @ e @ l], -1)
    return torch.cat([top, bottom], -2), info != 0


def lowrank_residual(us_i: torch.Tensor, v_i: torch.Tensor, us_j: torch.Tensor, v_j: torch.Tensor, r: int,
                     grams_i: tuple[torch.Tensor, torch.Tensor] | None = None,
                     grams_j: tuple[torch.Tensor, torch.Tensor] | None = None,
                     precision: torch.dtype = torch.float64) -> torch.Tensor:
    """Closed-form Eq. 2: ``||D - SVD_r(D)||_F`` for ``D = us_i v_iᵀ - us_j v_jᵀ`` (rank <= 2r).

    With ``P = [us_i, -us_j]`` (m x 2r) and ``Q = [v_i, v_j]`` (n x 2r), ``D = P Qᵀ``; for ``QᵀQ = L Lᵀ``,
    ``σ(D)² = eig(Lᵀ (PᵀP) L)``, a 2r x 2r symmetric problem, and ``d² = sum_{k>r} σ_k²``. Orthonormal
    ``v`` (``vᵀv = I``) take :func:`_core_orthonormal` (an r x r Cholesky); otherwise ``L`` is the
    Cholesky factor of the 2r x 2r ``QᵀQ`` (or of ``PᵀP`` with the roles swapped), and Householder QR
    of both stacked factors where both Grams are singular. The Grams are assembled from the
    per-block ``self_grams`` (pass them to reuse them across pairs) and the r x r cross terms, all in
    ``precision``. Leading batch dimensions broadcast (a stack of pruned blocks against one candidate).
    """
    shape = torch.broadcast_shapes(us_i.shape[:-2], us_j.shape[:-2])
    if not shape:                                       # one pair: run it as a batch of one
        return lowrank_residual(us_i[None], v_i[None], us_j, v_j, r,
                                None if grams_i is None else (grams_i[0][None], grams_i[1][None]),
                                grams_j, precision)[0]
    gi = grams_i if grams_i is not None else self_grams(us_i, v_i, precision)
    gj = grams_j if grams_j is not None else self_grams(us_j, v_j, precision)
    cross_u = (us_i.mT @ us_j).to(precision)           # us_iᵀ us_j
    cross_v = (v_i.mT @ v_j).to(precision)             # v_iᵀ v_j

    def block(a, b, c, d):                              # [[a, b], [c, d]] with broadcasting
        a, b, c, d = (x.expand(*shape, *x.shape[-2:]) for x in (a, b, c, d))
        return torch.cat([torch.cat([a, b], -1), torch.cat([c, d], -1)], -2)

    def expand(x: torch.Tensor) -> torch.Tensor:
        return x.expand(*shape, *x.shape[-2:])

    if _is_orthonormal(gi[1]) and _is_orthonormal(gj[1]):
        sym, todo = _core_orthonormal(expand(gi[0]), expand(gj[0]), expand(-cross_u), expand(cross_v))
    else:
        n2 = gi[0].shape[-1] + gj[0].shape[-1]
        sym = torch.empty(*shape, n2, n2, dtype=precision, device=us_i.device)
        todo = torch.ones(shape, dtype=torch.bool, device=us_i.device)
    use_qr = torch.zeros(shape, dtype=torch.bool, device=us_i.device)
    if todo.any():                                      # general path on the elements left
        gp = block(gi[0], -cross_u, -cross_u.mT, gj[0])[todo]   # PᵀP
        gq = block(gi[1], cross_v, cross_v.mT, gj[1])[todo]     # QᵀQ
        lq, info_q = torch.linalg.cholesky_ex(gq)
        part = lq.mT @ gp @ lq
        swap = info_q != 0
        if swap.any():
            lp, info_p = torch.linalg.cholesky_ex(gp[swap])
            part[swap] = lp.mT @ gq[swap] @ lp
            qr = torch.zeros_like(swap)
            qr[swap] = info_p != 0
            use_qr[todo] = qr
        sym[todo] = part
    lam = torch.linalg.eigvalsh(sym).clamp_min(0)       # ascending
    tail = lam[..., :max(lam.shape[-1] - r, 0)].sum(-1)
    if use_qr.any():
        p = torch.cat([expand(us_i), -expand(us_j)], -1)
        q = torch.cat([expand(v_i), expand(v_j)], -1)
        r_p = torch.linalg.qr(p[use_qr].to(precision), mode="r").R
        r_q = torch.linalg.qr(q[use_qr].to(precision), mode="r").R
        tail[use_qr] = _tail_energy(r_p @ r_q.mT, r, precision)
    return tail.sqrt().to(us_i.dtype)


def truncation_residual(d: torch.Tensor, r: int, precision: torch.dtype = torch.float64) -> torch.Tensor:
    """``||D - SVD_r(D)||_F = sqrt(sum_{k>r} σ_k(D)²)``, with ``σ²`` the eigenvalues of ``DᵀD`` (in ``precision``)."""
    return _tail_energy(d, r, precision).sqrt().to(d.dtype)


def aggregate_distances(per_matrix: dict[str, float], norms: dict[str, float], how: str) -> float:
    """One block distance from per-matrix distances (see the module docstring)."""
    d = list(per_matrix.values())
    if how == "sum_sq":
        return math.sqrt(sum(x * x for x in d))
    if how == "sum":
        return float(sum(d))
    if how == "mean_rel":
        return float(sum(per_matrix[k] / max(norms[k], 1e-30) for k in per_matrix) / len(per_matrix))
    raise FlexiError("prune.aggregate", f"unknown value {how!r}", f"use one of: {', '.join(AGGREGATES)}")


def _matrices(adapter: ModelAdapter, i: int) -> dict[str, torch.Tensor]:
    return {k: w.detach() for k, w in adapter.weights(i).items()}


@contextmanager
def parallel_map(workers: int | None = None) -> Iterator[Callable[[Callable[[T], R], list[T]], Iterator[R]]]:
    """An ordered ``map`` over a pool of ``workers`` threads, each running torch single-threaded.

    Why not torch's own threading: the distances are many small dense eigenproblems (2r x 2r), whose
    LAPACK tridiagonalisation is mostly level-2 BLAS and does not speed up with intra-op threads
    (measured on 2 cores: 512 x 512 ``eigvalsh`` 26 ms with 1 thread, 59 ms with 2, 13.5 ms each with
    2 single-threaded workers). Torch releases the GIL inside its kernels, so Python threads suffice.
    The previous intra-op thread count is restored on exit.
    """
    n = max(1, workers if workers is not None else torch.get_num_threads())
    if n == 1:
        yield lambda f, xs: map(f, xs)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(before)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[s:s + size] for s in range(0, len(items), size)]


def distance_table(adapter: ModelAdapter, pruned: list[int], *, metric: str = "lowrank", rank: int = 32,
                   aggregate: str = "sum_sq", svd: str = "gram", progress: bool = True,
                   chunk_bytes: int = 256 << 20, workers: int | None = None, precision: str = "float64"
                   ) -> tuple[dict[int, dict[int, float]], dict[str, int]]:
    """Block distances ``{pruned i: {unpruned j: d(i, j)}}`` and the effective rank per matrix name.

    Pruned blocks' factors are kept; candidates are streamed (each weight's truncated SVD is taken
    once) and compared with all pruned blocks in one batched call per matrix. The full-weight
    metrics batch the pruned blocks in groups of at most ``chunk_bytes`` of differences.
    ``workers`` (default: torch's thread count) candidates are processed concurrently, see
    :func:`parallel_map`. ``precision`` (``prune.precision``): dtype of the SVDs, Grams and eigenproblems.
    """
    check_choice(metric, METRICS, "prune.metric")
    check_choice(aggregate, AGGREGATES, "prune.aggregate")
    check_choice(svd, SVD_METHODS, "prune.svd")
    prec = PRECISIONS[check_choice(precision, tuple(PRECISIONS), "prune.precision")]
    rank = check_rank(rank)
    L = adapter.num_blocks
    cands = [j for j in range(L) if j not in set(pruned)]
    if metric == "nearest":
        return {i: {j: float(abs(i - j)) for j in cands} for i in pruned}, {}

    warned: set[str] = set()
    shapes = {k: tuple(w.shape) for k, w in _matrices(adapter, pruned[0]).items()}
    ranks = {k: effective_rank(rank, s, k, warned) for k, s in shapes.items()}
    mats_p = {i: _matrices(adapter, i) for i in pruned}
    norms = {i: {k: float(w.double().norm()) for k, w in m.items()} for i, m in mats_p.items()}
    per: dict[int, dict[int, dict[str, float]]] = {i: {j: {} for j in cands} for i in pruned}

    # a clamped matrix (r_W = min(m, n)) has rank(D) <= r_W, so its residual is exactly 0
    exact = {k for k, s in shapes.items() if ranks[k] == min(s) and metric in ("lowrank", "no_truncation")}
    for i in pruned:
        for j in cands:
            per[i][j].update({k: 0.0 for k in exact})
    if metric == "lowrank":
        def factors(b: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            return {k: truncated_svd(w, ranks[k], svd, prec) for k, w in _matrices(adapter, b).items()
                    if k not in exact}

        with parallel_map(workers) as pmap:
            fac_p = dict(zip(pruned, pmap(factors, pruned)))
            stacked = {k: (torch.stack([fac_p[i][k][0] for i in pruned]),
                           torch.stack([fac_p[i][k][1] for i in pruned])) for k in fac_p[pruned[0]]}
            grams_p = {k: self_grams(*f, prec) for k, f in stacked.items()}
            del fac_p

            def candidate(j: int) -> dict[str, torch.Tensor]:
                return {k: lowrank_residual(*stacked[k], us_j, v_j, ranks[k], grams_p[k],
                                            self_grams(us_j, v_j, prec), prec)
                        for k, (us_j, v_j) in factors(j).items()}

            bar = tqdm(total=len(cands), desc="base distances", disable=not progress, leave=False)
            for j, dists in zip(cands, pmap(candidate, cands)):
                for k, d in dists.items():
                    for a, i in enumerate(pruned):
                        per[i][j][k] = float(d[a])
                bar.update()
            bar.close()
    else:
        bar = tqdm(total=len(cands), desc="base distances", disable=not progress, leave=False)
        for j in cands:
            for k, w_j in _matrices(adapter, j).items():
                if k in exact:
                    continue
                wd = _work_dtype(w_j)
                per_pair = max(1, chunk_bytes // (w_j.numel() * torch.finfo(wd).bits // 8))
                for group in _chunks(pruned, per_pair):
                    diff = torch.stack([mats_p[i][k].to(wd) for i in group]) - w_j.to(wd)
                    if metric == "frobenius":
                        d = torch.linalg.matrix_norm(diff)
                    else:  # no_truncation
                        d = truncation_residual(diff, ranks[k], prec)
                    for a, i in enumerate(group):
                        per[i][j][k] = float(d[a])
            bar.update()
        bar.close()
    table = {i: {j: aggregate_distances(per[i][j], norms[i], aggregate) for j in cands} for i in pruned}
    return table, ranks


def choose_bases(distances: dict[int, dict[int, float]]) -> dict[int, int]:
    """``j* = argmin_j d(i, j)`` per pruned block (ties: the lower index)."""
    return {i: min(row, key=lambda j: (row[j], j)) for i, row in distances.items()}


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

    @property
    def kept(self) -> list[int]:
        return [b for b in range(self.num_blocks) if b not in set(self.pruned)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
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


def make_plan(model: nn.Module, scores: list[float] | None, *, ratio: float | None = 0.3,
              blocks: list[int] | None = None, rank: int = 32, metric: str = "lowrank",
              aggregate: str = "sum_sq", svd: str = "gram", importance_method: str | None = None,
              progress: bool = True, precision: str = "float64") -> Plan:
    """Choose the pruned blocks (lowest ``scores`` or ``blocks``) and a base for each (Eqs. 2-5)."""
    adapter = get_adapter(model)
    L = adapter.num_blocks
    check_choice(metric, METRICS, "prune.metric")
    check_choice(aggregate, AGGREGATES, "prune.aggregate")
    check_choice(svd, SVD_METHODS, "prune.svd")
    check_choice(precision, tuple(PRECISIONS), "prune.precision")
    rank = check_rank(rank)
    if scores is None:
        if blocks is None:
            raise FlexiError("prune.blocks", "no importance scores and no explicit block list",
                             "run score_importance, or list prune.blocks")
        scores = [0.0] * L
    if len(scores) != L:
        raise FlexiError("paths.importance", f"has {len(scores)} scores but the model has {L} blocks",
                         "re-run score_importance for this model (`dvc repro score_importance`)")
    pruned = choose_pruned(scores, ratio, blocks)
    distances, ranks = distance_table(adapter, pruned, metric=metric, rank=rank, aggregate=aggregate, svd=svd,
                                      progress=progress, precision=precision)
    base = choose_bases(distances)
    before = unique_param_count(model)
    per_block = block_param_counts(adapter)
    after = before - sum(per_block[i] for i in pruned)
    return Plan(num_blocks=L, pruned=pruned, base=base, distances=distances,
                layer_map=[base.get(p, p) for p in range(L)], params_before=before, params_after=after,
                removed_param_fraction=(before - after) / before, metric=metric, aggregate=aggregate, rank=rank,
                effective_rank=ranks, ratio=None if blocks is not None else ratio,
                importance_method=importance_method, scores=[float(s) for s in scores])


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
