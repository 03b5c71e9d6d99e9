"""Dense correspondence (glsd.eval.dense): exact features score 100 %, random ones chance."""
import pytest
import torch
from PIL import Image

from glsd.config import load_config
from glsd.data.geometry import cell_centers, make_geometry
from glsd.eval.dense import dense_correspondence, dense_indices, view_pair

GRID = (6, 6)


def _random_geometry(n, image=64.0, seed=0):
    """``(n, 5)`` boxes of 40-100 % side inside an image x image picture, random flips."""
    g = torch.Generator().manual_seed(seed)
    size = image * (0.4 + 0.6 * torch.rand(n, 2, generator=g))  # (n, 2) h, w
    top = (image - size[:, 0]) * torch.rand(n, generator=g)
    left = (image - size[:, 1]) * torch.rand(n, generator=g)
    flip = (torch.rand(n, generator=g) < 0.5).float()
    return torch.stack([top, left, size[:, 0], size[:, 1], flip], dim=1)


def _position_features(geom, grid, spacing=2.0, sigma=3.0):
    """Each cell centre p encoded as Gaussian bumps on a lattice of anchors a_j (every
    ``spacing`` px over the image and a margin): ``f_j(p) = exp(-|p - a_j|^2 / 2 sigma^2)``.

    ``f(p) . f(q)`` is then (to a tiny discretisation error) ``c * exp(-|p - q|^2 / 4 sigma^2)``,
    so the most similar cell is the nearest one in the original image. ``(N, gh*gw, A)``.
    """
    ticks = torch.arange(-12.0, 76.0 + spacing, spacing)
    anchors = torch.cartesian_prod(ticks, ticks)  # (A, 2)
    d2 = (cell_centers(geom, grid)[..., None, :] - anchors).pow(2).sum(-1)  # (N, cells, A)
    return torch.exp(-d2 / (2 * sigma ** 2))


def test_position_features_match_within_one_cell():
    ga, gb = _random_geometry(64, seed=0), _random_geometry(64, seed=1)
    res = dense_correspondence(_position_features(ga, GRID), _position_features(gb, GRID),
                               ga, gb, GRID, GRID)
    assert res["n_cells"] > 200
    assert res["within_one"] == 1.0
    assert res["exact"] >= 0.99
    assert res["mean_error_cells"] < 0.2
    assert res["n_images"] == 64 and 0 < res["counted_fraction"] < 1


def test_random_features_score_near_chance():
    ga, gb = _random_geometry(256, seed=2), _random_geometry(256, seed=3)
    g = torch.Generator().manual_seed(5)
    fa = torch.randn(256, 36, 32, generator=g)
    fb = torch.randn(256, 36, 32, generator=g)
    res = dense_correspondence(fa, fb, ga, gb, GRID, GRID)
    assert res["n_cells"] > 2000
    # Binomial std of a fraction over > 2000 cells is < 1 point; allow 4.
    assert abs(res["within_one"] - res["chance_within_one"]) < 0.04
    assert abs(res["exact"] - 1 / 36) < 0.02
    assert res["chance_exact"] == pytest.approx(1 / 36)
    # Clipped 3x3 blocks on a 6x6 grid: between 4/36 and 9/36.
    assert 4 / 36 < res["chance_within_one"] < 9 / 36


def test_identical_views_and_flip_are_exact():
    geom = make_geometry(4, 6, 30, 24, False)[None]
    flipped = make_geometry(4, 6, 30, 24, True)[None]
    feats = _position_features(geom, GRID)
    res = dense_correspondence(feats, feats, geom, geom, GRID, GRID)
    assert res["exact"] == 1.0 and res["counted_fraction"] == 1.0
    # B flipped: its column order is mirrored, the features follow the image content.
    res = dense_correspondence(feats, _position_features(flipped, GRID), geom, flipped, GRID, GRID)
    assert res["exact"] == 1.0
    # Identity features but mirrored B: every cell lands |2j - (W-1)| columns off.
    eye = torch.eye(36)[None]
    res = dense_correspondence(eye, eye, geom, flipped, GRID, GRID)
    expected = sum(abs(2 * j - 5) for j in range(6)) / 6
    assert res["mean_error_cells"] == pytest.approx(expected)


def test_cells_outside_b_do_not_count():
    a = make_geometry(0, 0, 10, 10, False)[None]
    b = make_geometry(30, 30, 10, 10, False)[None]
    feats = torch.randn(1, 36, 8)
    res = dense_correspondence(feats, feats, a, b, GRID, GRID)
    assert res["n_cells"] == 0 and res["within_one"] is None and res["counted_fraction"] == 0.0


def test_different_grids():
    ga, gb = _random_geometry(16, seed=6), _random_geometry(16, seed=7)
    res = dense_correspondence(_position_features(ga, (4, 4)), _position_features(gb, (8, 8)),
                               ga, gb, (4, 4), (8, 8))
    assert res["within_one"] == 1.0


def test_view_pairs_are_seeded_and_geometry_is_exact():
    cfg = load_config(None, ["crops.global_size=16", "eval.dense_num_images=5"])
    # Pixel value = column index: a view's mean column tells where its box is.
    cols = torch.arange(64, dtype=torch.uint8)[None, :, None].expand(64, 64, 3).contiguous()
    img = Image.fromarray(cols.numpy())
    va, vb, ga, gb = view_pair(img, 3, cfg)
    va2, vb2, ga2, gb2 = view_pair(img, 3, cfg)
    assert torch.equal(ga, ga2) and torch.equal(gb, gb2) and torch.equal(va, va2)
    assert not torch.equal(ga, gb)
    for view, geom in ((va, ga), (vb, gb)):
        left, width = float(geom[1]), float(geom[3])
        expected = left + width / 2 - 0.5
        seen = float(view[0].mean()) * cfg.crops.std[0] + cfg.crops.mean[0]  # undo the normalisation
        assert seen * 255 == pytest.approx(expected, abs=1.5)
    idx = dense_indices(100, cfg)
    assert idx == dense_indices(100, cfg) and len(idx) == 5 and idx == sorted(idx)
    assert dense_indices(3, cfg) == [0, 1, 2]
    assert float(ga[4]) in (0.0, 1.0)


def test_view_pair_flip_flag_matches_the_pixels():
    """A view's mean column cannot see a mirror: on a left-to-right ramp an unflipped view
    darkens to the left, a flipped one to the right, as its flag (geom[4]) says."""
    cfg = load_config(None, ["crops.global_size=16"])
    cols = torch.arange(64, dtype=torch.uint8)[None, :, None].expand(64, 64, 3).contiguous()
    img = Image.fromarray(cols.numpy())
    seen = set()
    for index in range(16):
        va, vb, ga, gb = view_pair(img, index, cfg)
        for view, geom in ((va, ga), (vb, gb)):
            flipped = bool(geom[4])
            left, right = float(view[0, :, 0].mean()), float(view[0, :, -1].mean())
            assert (left > right) if flipped else (left < right), (index, geom)
            seen.add(flipped)
    assert seen == {False, True}


def test_unreadable_image_is_skipped_or_a_data_error():
    """The dense probe reads through ImageSource.load: the same skip / fail rule and message
    as training (a DataError naming the file), never a raw traceback."""
    from glsd.data.sources import ImageSource
    from glsd.errors import DataError
    from glsd.eval.dense import _read_pairs

    good = Image.new("RGB", (40, 40), (120, 30, 60))

    def read(key):
        if key == "bad.jpg":
            raise OSError("cannot identify image file")
        return good

    source = ImageSource("folder", ["a.jpg", "bad.jpg", "c.jpg"], [0, 0, 0], ["x"], read)
    cfg = load_config(None, ["crops.global_size=16"])
    assert len(_read_pairs(source, [0, 1, 2], cfg)) == 2
    fail = load_config(None, ["crops.global_size=16", "data.on_error=fail"])
    with pytest.raises(DataError, match="bad.jpg.*data.on_error=skip"):
        _read_pairs(source, [0, 1, 2], fail)


def test_dense_refuses_an_evaluation_size_it_would_not_use(tmp_path):
    """Dense compares crops of crops.global_size: an eval.image_size override would be filed
    and recorded as a setting it never used."""
    from glsd.config import ConfigError
    from glsd.eval.runner import run_eval

    with pytest.raises(ConfigError, match="eval.image_size does not apply to it: give crops.global_size"):
        run_eval("dense", tmp_path, overrides=["eval.image_size=30"], device="cpu")
