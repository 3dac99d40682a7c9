"""Base-block distances (paper Eqs. 2-5): the linear algebra of choosing each pruned block's base.

For a pruned block ``i`` and each unpruned candidate ``j``,
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
(faster, and the natural choice on GPUs); ``benchmarks/bench_importance.py`` measures both, their
deviation and whether the chosen bases change (results: docs/results.md, "Benchmarks").

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

import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from flexigpt.errors import FlexiError


log = logging.getLogger(__name__)

AGGREGATES = ("sum_sq", "sum", "mean_rel")
SVD_METHODS = ("gram", "exact", "randomized")
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
ORTHONORMAL_TOL = 1e-5      # max |VᵀV - I| for the r x r Cholesky path of lowrank_residual
RANDOMIZED_OVERSAMPLE = 16  # extra sketch columns for svd="randomized"
RANDOMIZED_NITER = 4        # power iterations for svd="randomized"
T = TypeVar("T")
R = TypeVar("R")


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
      m >= n, else ``WWᵀ``); the same factors as the SVD up to rounding, and faster on CPU than
      LAPACK's SVD for these shapes (``benchmarks/bench_importance.py``). ``σ = sqrt(λ)``, and the other side is ``W V_r``
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


@dataclass(frozen=True)
class FullWeightMetric:
    """A base distance computed on the full weight difference ``D = W_i - W_j`` (batched: [B, m, n] -> [B])."""

    fn: Callable[[torch.Tensor, int, torch.dtype], torch.Tensor]  # (D, rank, precision) -> distances
    truncates: bool  # True: a matrix whose rank r >= min(m, n) is represented exactly, so its distance is 0


FULL_WEIGHT_METRICS: dict[str, FullWeightMetric] = {
    "no_truncation": FullWeightMetric(lambda d, r, prec: truncation_residual(d, r, prec), True),  # Eq. 2, full W
    "frobenius": FullWeightMetric(lambda d, r, prec: torch.linalg.matrix_norm(d), False),          # ||W_i - W_j||_F
}
"""Full-weight base metrics by name; add one here and it is a valid ``prune.metric``. ``lowrank`` (the
paper's, on truncated factors) and ``nearest`` (index distance) have their own code paths below."""
METRICS = ("lowrank", *FULL_WEIGHT_METRICS, "nearest")


def aggregate_distances(per_matrix: dict[str, float], norms: dict[str, float], how: str) -> float:
    """One block distance from per-matrix distances (see the module docstring)."""
    d = list(per_matrix.values())
    if how == "sum_sq":
        return math.sqrt(sum(x * x for x in d))
    if how == "sum":
        return float(sum(d))
    if how == "mean_rel":
        return float(sum(per_matrix[k] / max(norms[k], 1e-30) for k in per_matrix) / len(per_matrix))
    raise ValueError(f"unknown aggregate {how!r}; use one of {AGGREGATES}")


class BlockWeights(Protocol):
    """What base selection reads: an :class:`~flexigpt.model.arch.Arch` (a model in memory) or a
    :class:`~flexigpt.model.stream.StreamedModel` (block ``i`` read from the shards on each call)."""

    @property
    def num_blocks(self) -> int: ...

    def weights(self, i: int) -> dict[str, torch.Tensor]: ...


def _matrices(arch: BlockWeights, i: int) -> dict[str, torch.Tensor]:
    return {k: w.detach() for k, w in arch.weights(i).items()}


@contextmanager
def parallel_map(workers: int | None = None) -> Iterator[Callable[[Callable[[T], R], list[T]], Iterator[R]]]:
    """An ordered ``map`` over a pool of ``workers`` threads, each running torch single-threaded.

    Why not torch's own threading: the distances are many small dense eigenproblems (2r x 2r), whose
    LAPACK tridiagonalisation is mostly level-2 BLAS and does not speed up with intra-op threads,
    while single-threaded workers in parallel do (docs/results.md, "Benchmarks"). Torch releases
    the GIL inside its kernels, so Python threads suffice.
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


def distance_table(arch: BlockWeights, pruned: list[int], *, metric: str = "lowrank", rank: int = 32,
                   aggregate: str = "sum_sq", svd: str = "gram", progress: bool = True,
                   chunk_bytes: int = 256 << 20, workers: int | None = None, precision: str = "float64"
                   ) -> tuple[dict[int, dict[int, float]], dict[str, int]]:
    """Block distances ``{pruned i: {unpruned j: d(i, j)}}`` and the effective rank per matrix name.

    Pruned blocks' factors are kept; candidates are streamed (each weight's truncated SVD is taken
    once) and compared with all pruned blocks in one batched call per matrix, so with ``lowrank``
    at most one block's full weights are held at a time (``arch`` may read them from disk). The
    full-weight metrics keep the pruned blocks' weights and batch them in groups of at most
    ``chunk_bytes`` of differences.
    ``workers`` (default: torch's thread count) candidates are processed concurrently, see
    :func:`parallel_map`. ``precision`` (``prune.precision``): dtype of the SVDs, Grams and eigenproblems.
    """
    prec = PRECISIONS[precision]  # arguments come validated from PruneSettings (or a caller's literals)
    L = arch.num_blocks
    cands = [j for j in range(L) if j not in set(pruned)]
    if metric == "nearest":
        return {i: {j: float(abs(i - j)) for j in cands} for i in pruned}, {}

    warned: set[str] = set()
    shapes = {k: tuple(w.shape) for k, w in _matrices(arch, pruned[0]).items()}
    ranks = {k: effective_rank(rank, s, k, warned) for k, s in shapes.items()}
    mats_p = {i: _matrices(arch, i) for i in pruned} if metric != "lowrank" else {}
    norms = {i: {k: float(w.double().norm()) for k, w in (mats_p[i] if mats_p else _matrices(arch, i)).items()}
             for i in pruned}  # lowrank: each pruned block read, measured and dropped
    per: dict[int, dict[int, dict[str, float]]] = {i: {j: {} for j in cands} for i in pruned}

    # a clamped matrix (r_W = min(m, n)) has rank(D) <= r_W, so its residual is exactly 0
    truncates = metric == "lowrank" or FULL_WEIGHT_METRICS[metric].truncates
    exact = {k for k, s in shapes.items() if ranks[k] == min(s) and truncates}
    for i in pruned:
        for j in cands:
            per[i][j].update({k: 0.0 for k in exact})
    if metric == "lowrank":
        def factors(b: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            return {k: truncated_svd(w, ranks[k], svd, prec) for k, w in _matrices(arch, b).items()
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
            for k, w_j in _matrices(arch, j).items():
                if k in exact:
                    continue
                wd = _work_dtype(w_j)
                per_pair = max(1, chunk_bytes // (w_j.numel() * torch.finfo(wd).bits // 8))
                for group in _chunks(pruned, per_pair):
                    diff = torch.stack([mats_p[i][k].to(wd) for i in group]) - w_j.to(wd)
                    d = FULL_WEIGHT_METRICS[metric].fn(diff, ranks[k], prec)
                    for a, i in enumerate(group):
                        per[i][j][k] = float(d[a])
            bar.update()
        bar.close()
    table = {i: {j: aggregate_distances(per[i][j], norms[i], aggregate) for j in cands} for i in pruned}
    return table, ranks


def choose_bases(distances: dict[int, dict[int, float]], layer_types: list[str] | None = None) -> dict[int, int]:
    """``j* = argmin_j d(i, j)`` per pruned block (ties: the lower index).

    With ``layer_types`` (one per block), only candidates of the pruned block's own type are eligible
    (``prune.base_layer_type: same``); a pruned block with no kept block of its type is an error.
    """
    out = {}
    for i, row in distances.items():
        eligible = [j for j in row if layer_types is None or layer_types[j] == layer_types[i]]
        if not eligible:
            kept = sorted({layer_types[j] for j in row}) if layer_types else []
            raise FlexiError("prune.base_layer_type", f"pruned block {i} is a {layer_types[i]!r} layer and no kept "
                             f"block has that type (kept types: {kept})",
                             "set prune.base_layer_type: any, or prune fewer blocks of that type")
        out[i] = min(eligible, key=lambda j: (row[j], j))
    return out

