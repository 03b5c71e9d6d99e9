"""The soft_geometric and hybrid local matching arms: matches, the weighted local loss, config
and report."""
import pytest
import torch

from glsd.config import ConfigError, load_config
from glsd.data.geometry import cell_centers, make_geometry
from glsd.loss.dino import DINOLocalLoss, view_pairs
from glsd.loss.matching import Matches, cosine_similarities, match_pairs, squared_distances
from glsd.tools.study_report import new_arm_verdict, report_markdown, summarize
from test_losses import naive_local

TS, TT = 0.1, 0.05


def _random_geom(p, b, size=40.0, gen=None):
    """(P, B, 5) random crops inside a size x size image, half of them flipped."""
    r = torch.rand(p, b, 5, generator=gen)
    h, w = 8 + r[..., 2] * (size - 8), 8 + r[..., 3] * (size - 8)
    top, left = r[..., 0] * (size - h), r[..., 1] * (size - w)
    return torch.stack([top, left, h, w, (r[..., 4] > 0.5).float()], dim=-1)


def _pairs_input(s_grid, t_grid, seed, p=3, b=4, d=6):
    gen = torch.Generator().manual_seed(seed)
    s_geom, t_geom = _random_geom(p, b, gen=gen), _random_geom(p, b, gen=gen)
    ns, nt = s_grid[0] * s_grid[1], t_grid[0] * t_grid[1]
    feats = torch.randn(p, b, ns, d, generator=gen), torch.randn(p, b, nt, d, generator=gen)
    return s_geom, t_geom, feats


def _match(mode, s_geom, s_grid, t_geom, t_grid, feats, threshold="half_diagonal", **kw):
    sim = cosine_similarities(*feats) if feats[0] is not None else None
    return match_pairs(mode, threshold, s_geom, s_grid, t_geom, t_grid, sim, **kw)


def _dense(m: Matches, nt: int) -> torch.Tensor:
    """(..., Ns, Nt) weight of every teacher cell in each student cell's target."""
    if m.weight is None:
        return torch.nn.functional.one_hot(m.index, nt).double()
    out = torch.zeros(*m.index.shape[:-1], nt, dtype=torch.float64)
    return out.scatter_add_(-1, m.index, m.weight.double())


def _bracket(centres: list[float], value: float) -> dict[int, float]:
    """Linear-interpolation weights of ``value`` between the two nearest centres (by position),
    all of it on the outermost cell beyond the ends."""
    order = sorted(range(len(centres)), key=lambda i: centres[i])
    pos = [centres[i] for i in order]
    if value <= pos[0]:
        return {order[0]: 1.0}
    if value >= pos[-1]:
        return {order[-1]: 1.0}
    for a in range(len(pos) - 1):
        if pos[a] <= value <= pos[a + 1]:
            f = (value - pos[a]) / (pos[a + 1] - pos[a])
            return {order[a]: 1.0 - f, order[a + 1]: f}
    raise AssertionError("unreachable")


def naive_soft_weights(s_geom, s_grid, t_geom, t_grid) -> torch.Tensor:
    """(Ns, Nt) bilinear weights of one pair from explicit cell centres, one cell at a time."""
    (sh, sw), (th, tw) = s_grid, t_grid
    s_top, s_left, s_h, s_w, s_flip = s_geom.tolist()
    t_top, t_left, t_h, t_w, t_flip = t_geom.tolist()
    t_rows = [t_top + (r + 0.5) * t_h / th for r in range(th)]
    t_cols = [t_left + ((tw - c - 0.5) if t_flip else (c + 0.5)) * t_w / tw for c in range(tw)]
    out = torch.zeros(sh * sw, th * tw, dtype=torch.float64)
    for i in range(sh):
        for j in range(sw):
            y = s_top + (i + 0.5) * s_h / sh
            x = s_left + ((sw - j - 0.5) if s_flip else (j + 0.5)) * s_w / sw
            for r, wr in _bracket(t_rows, y).items():
                for c, wc in _bracket(t_cols, x).items():
                    out[i * sw + j, r * tw + c] += wr * wc
    return out


@pytest.mark.parametrize("s_grid,t_grid", [((4, 4), (2, 2)), ((2, 2), (4, 4)), ((3, 5), (4, 3)),
                                           ((1, 1), (3, 5)), ((2, 3), (1, 1))])
@pytest.mark.parametrize("seed", [0, 1])
def test_soft_geometric_matches_naive_bilinear(s_grid, t_grid, seed):
    s_geom, t_geom, feats = _pairs_input(s_grid, t_grid, seed)
    soft = _match("soft_geometric", s_geom, s_grid, t_geom, t_grid, feats).matches
    assert soft.index.shape == soft.weight.shape == (*s_geom.shape[:2], s_grid[0] * s_grid[1], 4)
    dense = _dense(soft, t_grid[0] * t_grid[1])
    for p in range(s_geom.shape[0]):
        for b in range(s_geom.shape[1]):
            want = naive_soft_weights(s_geom[p, b], s_grid, t_geom[p, b], t_grid)
            torch.testing.assert_close(dense[p, b], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s_grid,t_grid", [((4, 4), (2, 2)), ((3, 5), (4, 3))])
def test_soft_geometric_weights_sum_to_one_and_validity_is_geometric(s_grid, t_grid):
    s_geom, t_geom, feats = _pairs_input(s_grid, t_grid, 3)
    for threshold in ("half_diagonal", 4.0, "none"):
        soft = _match("soft_geometric", s_geom, s_grid, t_geom, t_grid, feats, threshold).matches
        geo = _match("geometric", s_geom, s_grid, t_geom, t_grid, feats, threshold).matches
        assert (soft.weight >= 0).all()
        torch.testing.assert_close(soft.weight.sum(-1), torch.ones_like(soft.weight[..., 0]))
        assert torch.equal(soft.valid, geo.valid)
        assert geo.valid.all() == (threshold == "none")  # the check has cells of both kinds


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4)])
def test_soft_geometric_on_the_same_view_is_geometric(flipped, grid):
    # Dyadic crop: every student centre lies exactly on a teacher centre.
    g = make_geometry(0, 0, 32, 32, flipped)[None, None]
    n = grid[0] * grid[1]
    feats = torch.randn(1, 1, n, 3), torch.randn(1, 1, n, 3)
    soft = _match("soft_geometric", g, grid, g, grid, feats).matches
    geo = _match("geometric", g, grid, g, grid, feats).matches
    assert torch.equal(_dense(soft, n), _dense(geo, n))
    assert geo.index.flatten().tolist() == list(range(n))
    # Any crop: equal up to rounding.
    g = make_geometry(3.3, 5.1, 24.7, 18.2, flipped)[None, None]
    soft = _match("soft_geometric", g, grid, g, grid, feats).matches
    torch.testing.assert_close(_dense(soft, n), _dense(geo, n), rtol=0, atol=1e-5)


def test_hybrid_with_one_candidate_is_geometric():
    for s_grid, t_grid in (((4, 4), (2, 2)), ((3, 5), (4, 3))):
        s_geom, t_geom, feats = _pairs_input(s_grid, t_grid, 5)
        hyb = _match("hybrid", s_geom, s_grid, t_geom, t_grid, feats, candidates=1)
        geo = _match("geometric", s_geom, s_grid, t_geom, t_grid, feats)
        assert torch.equal(hyb.matches.index, geo.matches.index)
        assert torch.equal(hyb.matches.valid, geo.matches.valid)
        assert hyb.matches.weight is None
        assert hyb.stats.keys() == geo.stats.keys() == {"geo_valid_frac", "sim_geo_agree", "sim_dist_cells"}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_hybrid_picks_the_most_similar_of_the_k_nearest(k):
    s_grid, t_grid = (4, 4), (3, 5)
    s_geom, t_geom, feats = _pairs_input(s_grid, t_grid, k)
    hyb = _match("hybrid", s_geom, s_grid, t_geom, t_grid, feats, candidates=k).matches
    geo = _match("geometric", s_geom, s_grid, t_geom, t_grid, feats).matches
    assert torch.equal(hyb.valid, geo.valid)
    d2 = squared_distances(cell_centers(s_geom, s_grid), cell_centers(t_geom, t_grid))
    kth = d2.sort(dim=-1).values[..., k - 1]
    chosen_d2 = torch.gather(d2, -1, hyb.index[..., None])[..., 0]
    assert (chosen_d2 <= kth).all()  # among the k nearest
    sim = torch.nn.functional.cosine_similarity(feats[0][..., :, None, :], feats[1][..., None, :, :], dim=-1)
    chosen_sim = torch.gather(sim, -1, hyb.index[..., None])[..., 0]
    strictly_near = d2 < kth[..., None]  # surely among the candidates, whatever the tie-break
    best_near = sim.masked_fill(~strictly_near, -2).amax(-1)
    assert (chosen_sim >= best_near - 1e-6).all()
    assert not torch.equal(hyb.index, geo.index)  # similarity does move some matches


def test_hybrid_with_every_cell_and_no_threshold_is_similarity():
    s_grid, t_grid = (3, 5), (4, 3)
    s_geom, t_geom, feats = _pairs_input(s_grid, t_grid, 7)
    hyb = _match("hybrid", s_geom, s_grid, t_geom, t_grid, feats, "none", candidates=12).matches
    sim = _match("similarity", s_geom, s_grid, t_geom, t_grid, feats, "none").matches
    assert torch.equal(hyb.index, sim.index) and hyb.valid.all()
    more = _match("hybrid", s_geom, s_grid, t_geom, t_grid, feats, "none", candidates=99).matches
    assert torch.equal(more.index, sim.index)


def test_match_pairs_names_an_unknown_mode():
    s_geom, t_geom, feats = _pairs_input((2, 2), (2, 2), 0)
    with pytest.raises(ValueError, match="'bilinear'.*soft_geometric, hybrid"):
        _match("bilinear", s_geom, (2, 2), t_geom, (2, 2), feats)


def test_arms_match_without_diagnostics_as_with():
    s_geom, t_geom, feats = _pairs_input((4, 4), (2, 2), 2)
    for mode in ("geometric", "similarity", "soft_geometric", "hybrid"):
        a = _match(mode, s_geom, (4, 4), t_geom, (2, 2), feats).matches
        no_feats = feats if mode in ("similarity", "hybrid") else (None, None)
        b = _match(mode, s_geom, (4, 4), t_geom, (2, 2), no_feats, diagnostics=False).matches
        assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)


# ---------------------------------------------------------------------------------------
# the local loss with weighted (soft) matches

def _soft_setup(seed, j=4):
    gen = torch.Generator().manual_seed(seed)
    vt, vl, b, k, nt = 2, 3, 2, 5, 6
    teacher = torch.randn(vt, b, nt, k, generator=gen)
    groups = [torch.randn(vt, b, 4, k, generator=gen), torch.randn(vl, b, 2, k, generator=gen)]
    pairs = [view_pairs(vt, 0, vt), view_pairs(vt, vt, vl)]
    matches = []
    for (t_idx, _), ns in zip(pairs, (4, 2)):
        shape = (len(t_idx), b, ns)
        w = torch.rand(*shape, j, generator=gen)
        matches.append(Matches(torch.randint(0, nt, (*shape, j), generator=gen),
                               torch.rand(*shape, generator=gen) > 0.3, w / w.sum(-1, keepdim=True)))
    return groups, teacher, pairs, matches, k


@pytest.mark.parametrize("normalize", ["all", "valid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_local_loss_value_and_gradient_match_naive(normalize, seed):
    groups, teacher, pairs, matches, k = _soft_setup(seed)
    center = torch.randn(1, k) * 0.3
    loss_fn = DINOLocalLoss(k, TS, normalize=normalize)
    loss_fn.center.center.copy_(center)
    groups = [g.clone().requires_grad_() for g in groups]
    teacher = teacher.clone().requires_grad_()
    loss = loss_fn(groups, teacher, pairs, matches, TT)
    loss.backward()
    assert teacher.grad is None  # no gradient reaches the teacher
    ref_groups = [g.detach().double().requires_grad_() for g in groups]
    want = naive_local(ref_groups, teacher.detach(), pairs, matches, center[0], normalize)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for g, ref in zip(groups, ref_groups):
        torch.testing.assert_close(g.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_one_candidate_of_weight_one_is_the_hard_match():
    groups, teacher, pairs, matches, k = _soft_setup(4, j=1)
    ones = [Matches(m.index, m.valid, torch.ones_like(m.weight)) for m in matches]
    hard = [Matches(m.index[..., 0], m.valid) for m in matches]
    soft_loss = DINOLocalLoss(k, TS)(groups, teacher, pairs, ones, TT)
    hard_loss = DINOLocalLoss(k, TS)(groups, teacher, pairs, hard, TT)
    torch.testing.assert_close(soft_loss, hard_loss)


# ---------------------------------------------------------------------------------------
# config and report

def test_hybrid_candidates_is_range_checked():
    assert load_config(None, ["loss.matching=hybrid"]).loss.hybrid_candidates == 4
    assert load_config(None, ["loss.matching=soft_geometric"]).loss.matching == "soft_geometric"
    with pytest.raises(ConfigError, match="loss.hybrid_candidates=0 must be >= 1"):
        load_config(None, ["loss.matching=hybrid", "loss.hybrid_candidates=0"])
    cfg = load_config(None, ["study.matchings=[none, geometric, soft_geometric, hybrid]"])
    assert cfg.study.matchings == ["none", "geometric", "soft_geometric", "hybrid"]


def _rec(fraction, matching, seed, top1):
    return {"status": "done", "fraction": fraction, "matching": matching, "seed": seed,
            "knn_top1": top1, "knn_floor_top1": 10.0, "n_images": 50,
            "final": {"sim_geo_agree": 0.5, "sim_dist_cells": 1.0, "geo_valid_frac": 0.9}}


def test_report_lists_new_arms_in_order_and_judges_them():
    vals = {"none": (30.0, 31.0), "geometric": (33.0, 34.0), "hybrid": (36.0, 37.5),
            "soft_geometric": (33.5, 33.0), "similarity": (29.0, 29.5)}
    records = [_rec(0.1, m, s, v) for m, pair in vals.items() for s, v in enumerate(pair)]
    text = report_markdown(records)
    assert "| fraction | images | floor | none | similarity | geometric | soft_geometric | hybrid |" in text
    # hybrid - geometric per seed: +3.0, +3.5 -> +3.25 > spread max(std) ~ 1.06
    assert ("- fraction 0.1, new arms: best new arm (hybrid) vs the best of none/similarity/geometric "
            "(geometric): +3.25 (beyond the seed spread") in text
    assert "geometric matching beats similarity matching: holds" in text  # paper checks unchanged
    close = summarize([_rec(0.1, "geometric", s, v) for s, v in enumerate((33.0, 36.0))]
                      + [_rec(0.1, "soft_geometric", s, v) for s, v in enumerate((34.0, 35.5))])
    assert "+0.25 (within the seed spread" in new_arm_verdict(close[0.1])
    only_old = [_rec(0.1, m, 0, 30.0) for m in ("none", "geometric")]
    assert "new arms" not in report_markdown(only_old)


# ---------------------------------------------------------------------------------------
# the training objective

CONVNET = ["model.backbone=glsd_convnet",
           "model.backbone_kwargs={widths: [8, 8, 16, 16], pool_after: [1, 3]}",
           "model.out_dim=12", "model.hidden_dim=16", "model.bottleneck_dim=8",
           "model.local_out_dim=10", "model.local_hidden_dim=12",
           "crops.global_size=32", "crops.local_size=16", "crops.num_global=2", "crops.num_local=2"]


def _objective_loss(student, views, geometry, *overrides, diagnostics=True):
    from glsd.models.heads import build_teacher
    from glsd.train.objective import GlobalLocalObjective

    cfg = load_config(None, CONVNET + list(overrides))
    teacher = build_teacher(cfg, student)
    with torch.no_grad():
        t_out = teacher(views[:2])
    return GlobalLocalObjective.from_config(cfg)(student(views), t_out, geometry, 0.04, diagnostics)


def test_objective_runs_the_new_arms_and_hybrid_one_is_geometric():
    from glsd.models.heads import build_network

    torch.manual_seed(0)
    student = build_network(load_config(None, CONVNET)).eval()  # eval: no drop path
    views = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32),
             torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    gen = torch.Generator().manual_seed(1)
    geometry = torch.cat([_random_geom(2, 2, gen=gen), _random_geom(2, 2, gen=gen)])  # (4, B, 5)
    geo = _objective_loss(student, views, geometry, "loss.matching=geometric")
    for diagnostics in (True, False):
        one = _objective_loss(student, views, geometry, "loss.matching=hybrid",
                              "loss.hybrid_candidates=1", diagnostics=diagnostics)
        torch.testing.assert_close(one.loss_local, geo.loss_local)
    for mode in ("soft_geometric", "hybrid"):
        terms = _objective_loss(student, views, geometry, f"loss.matching={mode}")
        assert torch.isfinite(terms.loss) and terms.loss_local > 0
        assert terms.diagnostics.keys() == geo.diagnostics.keys()
        assert terms.diagnostics["geo_valid_frac"] == geo.diagnostics["geo_valid_frac"]
        assert not torch.isclose(terms.loss_local, geo.loss_local)
