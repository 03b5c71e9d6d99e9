"""Local matching (glsd.loss.matching): geometric, similarity, thresholds, pair batching."""
import math

import pytest
import torch

from glsd.data.geometry import cell_centers, make_geometry
from glsd.loss.dino import view_pairs
from glsd.loss.matching import (cosine_similarities, geometric_match, match_pairs, match_threshold_sq,
                                nearest_cell_match, pair_similarities, similarity_match,
                                squared_distances)


def _geo_match(s_geom, s_grid, t_geom, t_grid, threshold="half_diagonal"):
    thr = match_threshold_sq(s_geom, s_grid, t_geom, t_grid, threshold)
    return geometric_match(cell_centers(s_geom, s_grid), cell_centers(t_geom, t_grid), thr)


def test_squared_distances_hand_worked():
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[3.0, 4.0], [1.0, 2.0], [0.0, -1.0]])
    assert squared_distances(a, b).tolist() == [[25, 5, 1], [8, 0, 10]]


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4)])
def test_identical_crops_identity_match(flipped, grid):
    g = make_geometry(3, 5, 24, 18, flipped)
    matches, d2 = _geo_match(g, grid, g, grid)
    n = grid[0] * grid[1]
    assert matches.index.tolist() == list(range(n))
    assert matches.valid.all()
    assert d2.abs().max() == 0


def test_nested_crop_all_to_cell_zero_and_valid():
    # teacher (0,0,32,32) 2x2: centres (8,8) (8,24) (24,8) (24,24)
    # student (0,0,16,16) 2x2: centres (4,4) (4,12) (12,4) (12,12): each at d^2 = 16+16 = 32
    # from teacher cell 0 (next nearest: (4,12)->(8,24) = 16+144 = 160).
    # threshold: max(8^2+8^2, 4^2+4^2) = 128 > 32 -> all valid.
    t = make_geometry(0, 0, 32, 32, False)
    s = make_geometry(0, 0, 16, 16, False)
    assert match_threshold_sq(s, (2, 2), t, (2, 2), "half_diagonal").item() == 128.0
    matches, d2 = _geo_match(s, (2, 2), t, (2, 2))
    assert matches.index.tolist() == [0, 0, 0, 0]
    assert d2.tolist() == [32, 32, 32, 32]
    assert matches.valid.tolist() == [True] * 4


def test_threshold_decides_validity_hand_worked():
    # teacher (0,0,32,32) 2x2; student (24,24,16,16) 2x2: centres (28,28) (28,36) (36,28) (36,36)
    # all nearest to teacher cell 3 at (24,24): d^2 = 32, 16+144=160, 160, 144+144=288.
    t = make_geometry(0, 0, 32, 32, False)
    s = make_geometry(24, 24, 16, 16, False)
    matches, d2 = _geo_match(s, (2, 2), t, (2, 2))
    assert matches.index.tolist() == [3, 3, 3, 3]
    assert d2.tolist() == [32, 160, 160, 288]
    assert matches.valid.tolist() == [True, False, False, False]  # threshold 128
    # numeric threshold in pixels: 13 px -> 169
    assert match_threshold_sq(s, (2, 2), t, (2, 2), 13.0).item() == 169.0
    matches, _ = _geo_match(s, (2, 2), t, (2, 2), 13.0)
    assert matches.valid.tolist() == [True, True, True, False]
    matches, _ = _geo_match(s, (2, 2), t, (2, 2), 5)  # an int works too: 25
    assert matches.valid.tolist() == [False, False, False, False]
    # off: everything is kept
    for off in (None, "none"):
        assert match_threshold_sq(s, (2, 2), t, (2, 2), off) is None
        matches, _ = _geo_match(s, (2, 2), t, (2, 2), off)
        assert matches.valid.all() and matches.index.tolist() == [3, 3, 3, 3]


def test_threshold_is_strict():
    # student (28,28,8,8) 1x1: centre (32,32); teacher cell 3 at (24,24): d^2 = 64+64 = 128
    # == threshold max(128, 4^2+4^2) -> not valid (distance^2 < threshold).
    t = make_geometry(0, 0, 32, 32, False)
    s = make_geometry(28, 28, 8, 8, False)
    matches, d2 = _geo_match(s, (1, 1), t, (2, 2))
    assert d2.tolist() == [128] and matches.index.tolist() == [3]
    assert matches.valid.tolist() == [False]


def test_threshold_takes_the_larger_half_diagonal():
    # teacher (0,0,8,8) 2x2: centres (2,2) (2,6) (6,2) (6,6), half-diag^2 = 2^2+2^2 = 8
    # student (0,0,32,32) 1x1: centre (16,16), half-diag^2 = 16^2+16^2 = 512
    # nearest teacher cell 3: d^2 = 10^2+10^2 = 200: invalid by the teacher's rule, valid by max.
    t = make_geometry(0, 0, 8, 8, False)
    s = make_geometry(0, 0, 32, 32, False)
    assert match_threshold_sq(s, (1, 1), t, (2, 2), "half_diagonal").item() == 512.0
    assert match_threshold_sq(t, (2, 2), s, (1, 1), "half_diagonal").item() == 512.0
    matches, d2 = _geo_match(s, (1, 1), t, (2, 2))
    assert matches.index.tolist() == [3] and d2.tolist() == [200]
    assert matches.valid.tolist() == [True]


def test_flipped_student_maps_to_mirrored_columns():
    t = make_geometry(0, 0, 32, 32, False)
    s = make_geometry(0, 0, 32, 32, True)
    matches, d2 = _geo_match(s, (2, 2), t, (2, 2))
    assert matches.index.tolist() == [1, 0, 3, 2]
    assert matches.valid.all() and d2.abs().max() == 0
    # 2x3 grid, both teacher and student flipped differently
    matches, _ = _geo_match(make_geometry(0, 0, 20, 30, True), (2, 3),
                            make_geometry(0, 0, 20, 30, False), (2, 3))
    assert matches.index.tolist() == [2, 1, 0, 5, 4, 3]
    # teacher flipped, student not: also mirrored
    matches, _ = _geo_match(make_geometry(0, 0, 20, 30, False), (2, 3),
                            make_geometry(0, 0, 20, 30, True), (2, 3))
    assert matches.index.tolist() == [2, 1, 0, 5, 4, 3]


def test_threshold_shape_batched():
    s = torch.stack([make_geometry(0, 0, 16, 16, False), make_geometry(0, 0, 8, 8, False)])
    t = torch.stack([make_geometry(0, 0, 32, 32, False), make_geometry(0, 0, 4, 4, False)])
    thr = match_threshold_sq(s, (2, 2), t, (2, 2), "half_diagonal")
    assert thr.tolist() == [128.0, 8.0]  # per sample: max(128, 32), max(2, 8)
    thr = match_threshold_sq(s[None].expand(3, 2, 5), (2, 2), t[None].expand(3, 2, 5), (2, 2), 2.0)
    assert thr.shape == (3, 2) and (thr == 4.0).all()


def test_similarity_match_argmax_cosine():
    # teacher cells: [10,0] (long, along x), [1,1] (diagonal), [0,1] (y)
    teacher = torch.tensor([[10.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # [1,1]: dot product favours cell 0 (10 vs 2), cosine favours cell 1 (1.0 vs 0.71)
    # [-1,-0.2]: cos -0.98 (0), -0.85 (1), -0.20 (2): the least negative wins
    student = torch.tensor([[1.0, 1.0], [0.1, 5.0], [3.0, 0.2], [-1.0, -0.2]])
    m = similarity_match(student, teacher)
    assert m.index.tolist() == [1, 2, 0, 2]
    assert m.valid.all()


def test_similarity_match_batched_and_unambiguous():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 6, 8)
    perm = torch.stack([torch.stack([torch.randperm(6)[:4] for _ in range(3)]) for _ in range(2)])
    student = torch.gather(teacher, 2, perm[..., None].expand(2, 3, 4, 8)) * 3.0  # scale-free
    m = similarity_match(student, teacher)
    assert m.index.shape == (2, 3, 4) and m.valid.shape == (2, 3, 4)
    assert torch.equal(m.index, perm)
    assert m.valid.all()


@pytest.mark.parametrize("n_teacher,n_student,first", [(2, 2, 0), (2, 6, 2), (1, 4, 1), (3, 3, 0)])
def test_pair_similarities_equal_the_per_pair_cosines(n_teacher, n_student, first):
    # the objective's batched form against cosine_similarities of each pair's gathered features
    gen = torch.Generator().manual_seed(n_teacher * 10 + n_student)
    s_feat = torch.randn(n_student, 3, 5, 8, generator=gen).to(torch.bfloat16)
    t_feat = torch.randn(n_teacher, 3, 7, 8, generator=gen).to(torch.bfloat16)
    t_idx, s_idx = view_pairs(n_teacher, first, n_student)
    got = pair_similarities(s_feat, t_feat, t_idx, s_idx)
    want = cosine_similarities(s_feat[s_idx], t_feat[t_idx])
    assert got.dtype == torch.float32 and got.shape == (len(t_idx), 3, 5, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _position_features(centers, anchors, sigma=4.0):
    """A feature per position: Gaussian bumps around anchor points (exactly encodes nearness)."""
    d2 = squared_distances(centers, anchors)
    return torch.exp(-(d2 - d2.min(-1, keepdim=True).values) / sigma)


def _random_geoms(shape, scale=40.0):
    tl = torch.rand(*shape, 2) * scale
    hw = torch.rand(*shape, 2) * scale + 8.0
    flip = (torch.rand(*shape, 1) > 0.5).float()
    return torch.cat([tl, hw, flip], dim=-1)


@pytest.mark.parametrize("mode", ["geometric", "similarity"])
def test_match_pairs_shapes_and_diagnostics(mode):
    torch.manual_seed(1)
    P, B, s_grid, t_grid = 3, 4, (2, 3), (4, 4)
    s_geom, t_geom = _random_geoms((P, B)), _random_geoms((P, B))
    s_geom[..., :2] = t_geom[..., :2] + 2.0  # overlapping crops: some valid matches
    t_centers = cell_centers(t_geom, t_grid)
    s_centers = cell_centers(s_geom, s_grid)
    # features encode position exactly: similarity argmax == nearest teacher centre
    t_feat = _position_features(t_centers, t_centers)
    s_feat = _position_features(s_centers, t_centers)
    out = match_pairs(mode, "half_diagonal", s_geom, s_grid, t_geom, t_grid,
                      cosine_similarities(s_feat, t_feat))
    assert out.matches.index.shape == (P, B, 6) and out.matches.valid.shape == (P, B, 6)
    assert out.matches.index.dtype == torch.long and out.matches.valid.dtype == torch.bool
    geo, _ = _geo_match(s_geom, s_grid, t_geom, t_grid)
    if mode == "geometric":
        assert torch.equal(out.matches.index, geo.index)
        assert torch.equal(out.matches.valid, geo.valid)
    else:
        assert out.matches.valid.all()
        assert torch.equal(out.matches.index, geo.index)  # position-encoding features
    frac = out.stats["geo_valid_frac"].item()
    assert 0.0 < frac < 1.0
    assert frac == pytest.approx(geo.valid.float().mean().item())
    assert out.stats["sim_geo_agree"].item() == pytest.approx(1.0)
    assert out.stats["sim_dist_cells"].item() >= 0.0
    assert all(v.ndim == 0 for v in out.stats.values())


def test_match_pairs_hand_worked_diagnostics():
    # one pair, one sample: teacher (0,0,32,32) 2x2; student (24,24,16,16) 2x2 -> 1 of 4 valid
    t = make_geometry(0, 0, 32, 32, False)[None, None]
    s = make_geometry(24, 24, 16, 16, False)[None, None]
    t_feat = torch.eye(4)[None, None]
    s_feat = torch.eye(4)[[3, 3, 3, 3]][None, None]  # similarity also picks cell 3 everywhere
    out = match_pairs("geometric", "half_diagonal", s, (2, 2), t, (2, 2),
                      cosine_similarities(s_feat, t_feat))
    assert out.matches.index.tolist() == [[[3, 3, 3, 3]]]
    assert out.matches.valid.tolist() == [[[True, False, False, False]]]
    assert out.stats["geo_valid_frac"].item() == pytest.approx(0.25)
    assert out.stats["sim_geo_agree"].item() == pytest.approx(1.0)
    # distances (in teacher cells of sqrt(16*16)=16 px): sqrt(32), sqrt(160) x2, sqrt(288)
    expected = (math.sqrt(32) + 2 * math.sqrt(160) + math.sqrt(288)) / 4 / 16
    assert out.stats["sim_dist_cells"].item() == pytest.approx(expected, rel=1e-5)
    out = match_pairs("geometric", "none", s, (2, 2), t, (2, 2),
                      cosine_similarities(s_feat, t_feat))
    assert out.matches.valid.all() and out.stats["geo_valid_frac"].item() == 1.0


def test_match_pairs_disagreement_diagnostics():
    # identical crops, but student features are the teacher's mirrored left-right:
    # similarity picks the mirrored column (16 px = 1 teacher cell away), geometry the identity.
    g = make_geometry(0, 0, 32, 32, False)[None, None]
    t_feat = torch.eye(4)[None, None]
    s_feat = torch.eye(4)[[1, 0, 3, 2]][None, None]
    out = match_pairs("similarity", "half_diagonal", g, (2, 2), g, (2, 2),
                      cosine_similarities(s_feat, t_feat))
    assert out.matches.index.tolist() == [[[1, 0, 3, 2]]]
    assert out.matches.valid.all()
    assert out.stats["geo_valid_frac"].item() == 1.0
    assert out.stats["sim_geo_agree"].item() == 0.0
    assert out.stats["sim_dist_cells"].item() == pytest.approx(1.0)
    out = match_pairs("geometric", "half_diagonal", g, (2, 2), g, (2, 2),
                      cosine_similarities(s_feat, t_feat))
    assert out.matches.index.tolist() == [[[0, 1, 2, 3]]]


def test_match_pairs_no_valid_cells_agree_is_finite():
    t = make_geometry(0, 0, 8, 8, False)[None, None]
    s = make_geometry(100, 100, 8, 8, False)[None, None]  # far away: nothing valid
    feat = torch.randn(1, 1, 4, 3)
    out = match_pairs("geometric", "half_diagonal", s, (2, 2), t, (2, 2), cosine_similarities(feat, feat))
    assert not out.matches.valid.any()
    assert out.stats["geo_valid_frac"].item() == 0.0
    assert torch.isfinite(out.stats["sim_geo_agree"])


@pytest.mark.parametrize("s_grid,t_grid", [((2, 2), (4, 4)), ((4, 4), (8, 8)), ((3, 5), (7, 6)),
                                           ((8, 8), (8, 8)), ((1, 1), (1, 1))])
@pytest.mark.parametrize("seed", [0, 1])
def test_nearest_cell_match_is_the_distance_table_argmin(s_grid, t_grid, seed):
    # The analytic nearest cell (rounded grid coordinates) against the (Ns, Nt) table's argmin,
    # on random crops (flips included; many student cells outside the teacher crop): the
    # same cell wherever the table has no near tie, the same distance and validity.
    torch.manual_seed(seed)
    s_geom, t_geom = _random_geoms((64,)), _random_geoms((64,))
    s_centers = cell_centers(s_geom, s_grid)
    d2 = squared_distances(s_centers, cell_centers(t_geom, t_grid))
    thr = match_threshold_sq(s_geom, s_grid, t_geom, t_grid, "half_diagonal")
    table, table_d2 = geometric_match(s_centers, cell_centers(t_geom, t_grid), thr)
    fast, fast_d2 = nearest_cell_match(s_centers, t_geom, t_grid, thr)
    best2 = d2.topk(min(2, d2.shape[-1]), dim=-1, largest=False).values
    clear = (best2[..., -1] - best2[..., 0] > 1e-3 * (1 + best2[..., 0])) | (d2.shape[-1] == 1)
    assert clear.float().mean() > 0.9  # the comparison is not vacuous
    assert torch.equal(fast.index[clear], table.index[clear])
    same = fast.index == table.index
    assert torch.equal(fast_d2[same], table_d2[same])
    assert torch.equal(fast.valid[same], table.valid[same])
    torch.testing.assert_close(fast_d2, table_d2, rtol=1e-5, atol=1e-4)  # near ties: equally near


@pytest.mark.parametrize("flipped", [False, True])
def test_nearest_cell_match_breaks_exact_ties_as_the_table(flipped):
    # A student centre exactly between the centres of a 2x2 teacher grid: every cell is as
    # near; the table's min takes the first (index 0), and so must the analytic rule.
    t_geom = make_geometry(0, 0, 4, 4, flipped)
    s_geom = make_geometry(1, 1, 2, 2, False)  # one cell, centred at (2, 2)
    s_centers = cell_centers(s_geom, (1, 1))
    table, _ = geometric_match(s_centers, cell_centers(t_geom, (2, 2)), None)
    fast, _ = nearest_cell_match(s_centers, t_geom, (2, 2), None)
    assert table.index.item() == fast.index.item() == 0
