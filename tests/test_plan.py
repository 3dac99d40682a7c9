"""Pruning plan: pruned-set choice, closed-form Eq. 2 distances, base selection, validation."""
from __future__ import annotations

import csv
import json
import logging
import math

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_opt
from flexigpt.compress import distance as dist
from flexigpt.compress import plan as pl
from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of
from flexigpt.config import Params
from flexigpt.errors import FlexiError


pytestmark = pytest.mark.usefixtures("one_thread")


def _svd_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def literal_eq2(w_i: torch.Tensor, w_j: torch.Tensor, r: int) -> float:
    """Eq. 2 as written: ||Ŵ_i - (Ŵ_j + Δ_{i-j})||_F with full SVDs."""
    wi_hat, wj_hat = _svd_r(w_i.detach(), r), _svd_r(w_j.detach(), r)
    delta = _svd_r(wi_hat - wj_hat, r)
    return float(torch.linalg.matrix_norm(wi_hat - (wj_hat + delta)))


# -- Eq. 2 in closed form -------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,r", [(40, 30, 5), (30, 50, 8), (64, 64, 40), (64, 96, 33), (96, 20, 12)])
@pytest.mark.parametrize("svd", ["gram", "exact"])
def test_closed_form_equals_literal_eq2(m, n, r, svd):
    g = torch.Generator().manual_seed(m * n + r)
    # decaying spectra, like trained weights
    scale = torch.logspace(0, -2, min(m, n), dtype=torch.float64)
    mats = []
    for _ in range(2):
        u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
        mats.append(u @ torch.diag(scale) @ v.T + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64))
    w_i, w_j = mats
    a, b = dist.truncated_svd(w_i, r, svd), dist.truncated_svd(w_j, r, svd)
    got = float(dist.lowrank_residual(*a, *b, r))
    assert got == pytest.approx(literal_eq2(w_i, w_j, r), rel=1e-7, abs=1e-10)
    # float32 weights: same answer to float32 accuracy
    a32, b32 = dist.truncated_svd(w_i.float(), r, svd), dist.truncated_svd(w_j.float(), r, svd)
    assert float(dist.lowrank_residual(*a32, *b32, r)) == pytest.approx(got, rel=2e-3)


def test_closed_form_batches_over_pruned_blocks():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(24, 18, generator=g, dtype=torch.float64) for _ in range(4)]
    f = [dist.truncated_svd(w, 5) for w in ws]
    us = torch.stack([f[k][0] for k in range(3)])
    v = torch.stack([f[k][1] for k in range(3)])
    batched = dist.lowrank_residual(us, v, *f[3], 5)
    for k in range(3):
        assert float(batched[k]) == pytest.approx(literal_eq2(ws[k], ws[3], 5), rel=1e-8)


def _decaying(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.logspace(0, -2, min(m, n), dtype=torch.float64)) @ v.T


def test_general_path_matches_orthonormal_path():
    """Non-orthonormal factors of the same Ŵ (us M⁻ᵀ, v M) skip the r x r shortcut; same distance."""
    g = torch.Generator().manual_seed(11)
    w_i, w_j = _decaying(50, 40, g), _decaying(50, 40, g)
    a, b = dist.truncated_svd(w_i, 9), dist.truncated_svd(w_j, 9)
    m = torch.eye(9, dtype=torch.float64) + 0.3 * torch.randn(9, 9, generator=g, dtype=torch.float64)
    a_skew = (a[0] @ torch.linalg.inv(m).T, a[1] @ m)
    assert not dist._is_orthonormal(a_skew[1].T @ a_skew[1])
    want = literal_eq2(w_i, w_j, 9)
    assert float(dist.lowrank_residual(*a, *b, 9)) == pytest.approx(want, rel=1e-8)
    assert float(dist.lowrank_residual(*a_skew, *b, 9)) == pytest.approx(want, rel=1e-8)


def test_shared_subspace_falls_back_and_stays_exact():
    """W_j = W_i + a rank-1 change inside W_i's row space: I - CᵀC is singular, the general path answers."""
    g = torch.Generator().manual_seed(12)
    w_i = _decaying(30, 30, g)
    v1 = torch.linalg.svd(w_i).Vh[0]
    w_j = w_i + 0.5 * torch.outer(torch.randn(30, generator=g, dtype=torch.float64), v1)
    for r in (30, 12):   # r = 30: identical row spaces; r = 12: overlapping ones
        a, b = dist.truncated_svd(w_i, r), dist.truncated_svd(w_j, r)
        assert float(dist.lowrank_residual(*a, *b, r)) == pytest.approx(literal_eq2(w_i, w_j, r), rel=1e-6, abs=1e-7)
    same = dist.truncated_svd(w_i, 12)
    assert float(dist.lowrank_residual(*same, *same, 12)) == pytest.approx(0.0, abs=1e-6)


def test_float32_precision_is_close_to_float64():
    g = torch.Generator().manual_seed(13)
    ws = [_decaying(64, 48, g).float() for _ in range(4)]
    for prec, rel in ((torch.float64, 1e-4), (torch.float32, 1e-3)):
        f = [dist.truncated_svd(w, 20, "gram", prec) for w in ws]
        us, v = torch.stack([x[0] for x in f[:3]]), torch.stack([x[1] for x in f[:3]])
        got = dist.lowrank_residual(us, v, *f[3], 20, precision=prec)
        assert got.dtype == torch.float32
        for k in range(3):
            assert float(got[k]) == pytest.approx(literal_eq2(ws[k].double(), ws[3].double(), 20), rel=rel)


def test_no_truncation_residual_equals_literal():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(2, 30, 45, generator=g, dtype=torch.float64)
    got = dist.truncation_residual(d, 7)
    for k in range(2):
        want = float(torch.linalg.matrix_norm(d[k] - _svd_r(d[k], 7)))
        assert float(got[k]) == pytest.approx(want, rel=1e-9)


def test_randomized_svd_is_close_to_exact():
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(200, 100, generator=g))
    v, _ = torch.linalg.qr(torch.randn(150, 100, generator=g))
    w = u @ torch.diag(torch.logspace(1, -2, 100)) @ v.T
    us_e, v_e = dist.truncated_svd(w, 10, "exact")
    us_r, v_r = dist.truncated_svd(w, 10, "randomized")
    assert torch.allclose(us_e @ v_e.T, us_r @ v_r.T, atol=1e-3)


# -- choosing the pruned blocks ----------------------------------------------------------------------------
def test_ratio_picks_the_lowest_scores():
    scores = [0.9, 0.1, 0.5, 0.2, 0.05, 0.7, 0.3, 0.3, 0.6, 0.8]
    assert pl.choose_pruned(scores, ratio=0.3) == [1, 3, 4]
    assert pl.choose_pruned(scores, ratio=0.4) == [1, 3, 4, 6]  # tie 6/7 at the boundary -> lower index
    assert len(pl.choose_pruned([0.0] * 30, ratio=0.3)) == 9
    assert len(pl.choose_pruned([0.0] * 30, ratio=0.4)) == 12
    assert pl.n_from_ratio(0.25, 10) == 3  # 2.5 rounds half up
    assert pl.choose_pruned(scores, blocks=[7, 2]) == [2, 7]


# -- the plan on tiny models -------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", dist.METRICS)
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_plan_respects_ratio_and_never_picks_a_pruned_base(kind, metric):
    model = make_tiny_llama(n_layers=8) if kind == "llama" else make_tiny_opt(n_layers=6)
    L = arch_of(model).num_blocks
    scores = torch.rand(L, generator=torch.Generator().manual_seed(7)).tolist()
    plan = pl.make_plan(model, scores, ratio=0.4, rank=4, metric=metric, progress=False)
    assert len(plan.pruned) == round(0.4 * L) and plan.pruned == sorted(plan.pruned)
    assert plan.pruned == sorted(sorted(range(L), key=lambda i: scores[i])[:len(plan.pruned)])
    kept = set(range(L)) - set(plan.pruned)
    assert set(plan.base) == set(plan.pruned) and set(plan.base.values()) <= kept
    for i in plan.pruned:
        assert set(plan.distances[i]) == kept
        assert plan.distances[i][plan.base[i]] == min(plan.distances[i].values())
    assert plan.layer_map == [plan.base.get(p, p) for p in range(L)]
    assert not set(plan.layer_map) & set(plan.pruned)


def test_param_counts_and_json_round_trip(tiny_llama):
    a = arch_of(tiny_llama)
    plan = pl.make_plan(tiny_llama, None, ratio=None, blocks=[1, 4], rank=3, progress=False)
    total = fm.unique_params(tiny_llama)
    per_block = sum(p.numel() for p in a.blocks()[1].parameters())
    assert plan.params_before == total
    assert plan.params_after == total - 2 * per_block
    assert plan.removed_param_fraction == pytest.approx(2 * per_block / total)
    back = pl.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.base[1] in back.kept


def test_nearest_ties_go_to_the_earlier_block(tiny_llama):
    plan = pl.make_plan(tiny_llama, None, ratio=None, blocks=[2, 3], metric="nearest", progress=False)
    assert plan.base == {2: 1, 3: 4}  # block 2: neighbours 1 (d=1) and 4 (d=2); block 3: 4 (d=1) beats 1 (d=2)
    plan = pl.make_plan(tiny_llama, None, ratio=None, blocks=[3], metric="nearest", progress=False)
    assert plan.base == {3: 2}  # 2 and 4 tie at distance 1 -> the earlier block


@pytest.mark.parametrize("aggregate", dist.AGGREGATES)
def test_aggregates_and_frobenius_match_manual(tiny_opt, aggregate):
    a = arch_of(tiny_opt)
    table, _ = dist.distance_table(a, [1], metric="frobenius", aggregate=aggregate, progress=False)
    w1 = {k: w.detach() for k, w in a.weights(1).items()}
    for j in (0, 2, 3):
        d = {k: float(torch.linalg.matrix_norm(w1[k].double() - w.detach().double())) for k, w in a.weights(j).items()}
        want = {"sum_sq": math.sqrt(sum(x * x for x in d.values())), "sum": sum(d.values()),
                "mean_rel": sum(d[k] / float(w1[k].double().norm()) for k in d) / len(d)}[aggregate]
        assert table[1][j] == pytest.approx(want, rel=1e-5)


def test_lowrank_block_distance_is_sum_sq_of_literal_eq2(tiny_llama):
    a = arch_of(tiny_llama)
    table, ranks = dist.distance_table(a, [2], rank=4, progress=False)
    w2 = a.weights(2)
    want = math.sqrt(sum(literal_eq2(w2[k].double(), w.double(), 4) ** 2 for k, w in a.weights(5).items()))
    assert table[2][5] == pytest.approx(want, rel=1e-4)
    assert set(ranks.values()) == {4}


def test_float32_precision_table_is_close(tiny_llama):
    a = arch_of(tiny_llama)
    t64, _ = dist.distance_table(a, [1, 2], rank=4, progress=False)
    t32, _ = dist.distance_table(a, [1, 2], rank=4, progress=False, precision="float32")
    for i in t64:
        for j in t64[i]:
            assert t32[i][j] == pytest.approx(t64[i][j], rel=1e-4)


def test_parallel_candidates_give_the_same_table_and_restore_threads(tiny_llama):
    a = arch_of(tiny_llama)
    serial, _ = dist.distance_table(a, [1, 2], rank=4, progress=False, workers=1)
    threads = torch.get_num_threads()
    pooled, _ = dist.distance_table(a, [1, 2], rank=4, progress=False, workers=2)
    assert pooled == serial
    assert torch.get_num_threads() == threads


def test_rank_above_matrix_size_is_clamped_with_a_warning(tiny_llama, caplog):
    a = arch_of(tiny_llama)  # k/v_proj are 16 x 32, the rest >= 32 x 32
    with caplog.at_level(logging.WARNING, logger="flexigpt.compress.plan"):
        table, ranks = dist.distance_table(a, [2], rank=20, progress=False)
    assert ranks["self_attn.k_proj"] == ranks["self_attn.v_proj"] == 16 and ranks["self_attn.q_proj"] == 20
    assert sum("clamped to 16" in r.getMessage() for r in caplog.records) == 2
    w2 = a.weights(2)
    want = math.sqrt(sum(literal_eq2(w2[k].double(), w.double(), ranks[k]) ** 2 for k, w in a.weights(4).items()))
    assert table[2][4] == pytest.approx(want, rel=1e-4)
    # a clamped matrix's truncation is exact, so it adds nothing to the low-rank distance
    k = "self_attn.k_proj"
    assert literal_eq2(w2[k].double(), a.weights(4)[k].double(), 16) == pytest.approx(0.0, abs=1e-9)


def test_distance_csvs(tiny_llama, tmp_path):
    from flexigpt.report.plots import distance_heatmap, importance_bars

    plan = pl.make_plan(tiny_llama, [0.5, 0.1, 0.4, 0.2, 0.3, 0.6], ratio=0.5, rank=2, progress=False)
    pl.write_distance_csvs(plan, tmp_path / "wide.csv", tmp_path / "long.csv")
    wide = list(csv.reader(open(tmp_path / "wide.csv")))
    assert wide[0] == ["pruned", *map(str, range(6))] and [int(r[0]) for r in wide[1:]] == plan.pruned == [1, 3, 4]
    for row in wide[1:]:
        assert all((row[1 + j] == "") == (j in plan.pruned) for j in range(6))
    long = list(csv.DictReader(open(tmp_path / "long.csv")))
    assert len(long) == 3 * 3 and set(long[0]) == {"pruned", "candidate", "distance"}
    distance_heatmap(plan.distances, plan.num_blocks, tmp_path / "h.png", base=plan.base)
    importance_bars(plan.scores, tmp_path / "b.png", pruned=plan.pruned)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "b.png").stat().st_size > 1000


# -- bad inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,param", [
    ({"ratio": 0.0}, "prune.ratio"),
    ({"ratio": 1.0}, "prune.ratio"),
    ({"ratio": 1.5}, "prune.ratio"),
    ({"ratio": -0.2}, "prune.ratio"),
    ({"ratio": "0.3"}, "prune.ratio"),
    ({"ratio": float("nan")}, "prune.ratio"),
    ({"ratio": 0.05}, "prune.ratio"),        # 0.05 x 6 -> 0 blocks
    ({"ratio": 0.95}, "prune.ratio"),        # 0.95 x 6 -> all 6 blocks
    ({"ratio": None}, "prune.ratio"),        # neither ratio nor blocks
    ({"ratio": 0.3, "blocks": [1]}, "prune.blocks"),
    ({"ratio": None, "blocks": [1, 1]}, "prune.blocks"),
    ({"ratio": None, "blocks": [6]}, "prune.blocks"),
    ({"ratio": None, "blocks": [-1]}, "prune.blocks"),
    ({"ratio": None, "blocks": []}, "prune.blocks"),
    ({"ratio": None, "blocks": [0, 1, 2, 3, 4, 5]}, "prune.blocks"),
    ({"ratio": None, "blocks": [1.5]}, "prune.blocks"),
    ({"ratio": None, "blocks": "1,2"}, "prune.blocks"),
])
def test_bad_pruning_choice_raises_flexierror(kwargs, param):
    with pytest.raises(FlexiError) as e:
        pl.choose_pruned([0.1] * 6, **kwargs)
    assert e.value.param == param


@pytest.mark.parametrize("kwargs,param", [
    ({"rank": 0}, "prune.rank"),
    ({"rank": -4}, "prune.rank"),
    ({"rank": 2.5}, "prune.rank"),
    ({"rank": True}, "prune.rank"),
    ({"metric": "cosine"}, "prune.metric"),
    ({"aggregate": "max"}, "prune.aggregate"),
    ({"svd": "qr"}, "prune.svd"),
    ({"precision": "float16"}, "prune.precision"),
])
def test_bad_plan_params_raise_flexierror(tiny_llama, kwargs, param):
    with pytest.raises(FlexiError) as e:
        pl.make_plan(tiny_llama, [0.1] * 6, **{"ratio": 0.3, **kwargs}, progress=False)
    assert e.value.param == param


def test_score_count_mismatch_names_importance(tiny_llama):
    with pytest.raises(FlexiError) as e:
        pl.make_plan(tiny_llama, [0.1] * 5, ratio=0.3, progress=False)
    assert e.value.param == "paths.importance"


# -- the prune step's validation (before the model loads) --------------------------------------------------------
def _plan(tmp_path, importance=True, **prune):
    """What the prune stage runs: settings from params, then plan_model (on a model folder without weights)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6, "hidden_size": 64,
                                                   "num_attention_heads": 4}))  # no weights: loading would fail
    imp = tmp_path / "imp"
    if importance:
        imp.mkdir(exist_ok=True)
        (imp / "importance.json").write_text(json.dumps({"scores": [0.1] * 6, "method": "block_influence"}))
    data = {"prune": {"ratio": 0.3, "blocks": None, "rank": 32, "metric": "lowrank", "aggregate": "sum_sq", **prune}}
    return pl.plan_model(pl.PruneSettings.from_params(Params(data)), model, imp)


@pytest.mark.parametrize("override,param", [
    ({"ratio": 1.2}, "prune.ratio"),
    ({"ratio": 0.01}, "prune.ratio"),
    ({"ratio": None, "blocks": [2, 2]}, "prune.blocks"),
    ({"ratio": None, "blocks": [9]}, "prune.blocks"),
    ({"rank": 0}, "prune.rank"),
    ({"metric": "l2"}, "prune.metric"),
    ({"precision": "half"}, "prune.precision"),
])
def test_prune_validates_before_loading(tmp_path, override, param):
    with pytest.raises(FlexiError) as e:
        _plan(tmp_path, **override)
    assert e.value.param == param


def test_prune_needs_importance_scores(tmp_path):
    with pytest.raises(FlexiError) as e:
        _plan(tmp_path, importance=False)
    assert e.value.param == "paths.importance" and "score_importance" in e.value.fix


def test_bases_keep_the_layer_type_when_asked():
    from flexigpt.compress.distance import choose_bases

    d = {1: {0: 0.5, 2: 0.1, 3: 0.9}, 4: {0: 0.2, 2: 0.3, 3: 0.1}}
    types = ["full", "sliding", "sliding", "full", "full"]
    assert choose_bases(d) == {1: 2, 4: 3}  # nearest, whatever the type
    assert choose_bases(d, types) == {1: 2, 4: 3}
    types = ["sliding", "full", "sliding", "full", "sliding"]
    assert choose_bases(d, types) == {1: 3, 4: 0}  # nearer blocks of the other type are passed over
    with pytest.raises(FlexiError) as e:
        choose_bases({1: {0: 0.1, 2: 0.2}}, ["sliding", "full", "sliding"])
    assert e.value.param == "prune.base_layer_type" and "any" in e.value.fix
