"""Analytic cell centres of a crop (glsd.data.geometry)."""
import pytest
import torch

from glsd.data.geometry import cell_centers, cell_size, half_diagonal_sq, make_geometry

BOXES = [  # top, left, height, width
    (0.0, 0.0, 32.0, 32.0),
    (3.5, 7.25, 20.0, 12.0),
    (100.0, 40.0, 17.0, 51.0),
]
GRIDS = [(1, 1), (2, 2), (3, 5), (4, 2)]


def _grid(centers, gh, gw):
    return centers.reshape(gh, gw, 2)


def test_make_geometry_record():
    g = make_geometry(1, 2, 3, 4, True)
    assert g.dtype == torch.float32
    assert g.tolist() == [1.0, 2.0, 3.0, 4.0, 1.0]
    assert make_geometry(1, 2, 3, 4, False)[4] == 0.0


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("flipped", [False, True])
def test_centres_inside_box(box, grid, flipped):
    top, left, h, w = box
    c = cell_centers(make_geometry(*box, flipped), grid)
    assert c.shape == (grid[0] * grid[1], 2)
    # strictly inside, at least half a cell away from each border
    ch, cw = h / grid[0], w / grid[1]
    assert (c[:, 0] >= top + ch / 2 - 1e-4).all() and (c[:, 0] <= top + h - ch / 2 + 1e-4).all()
    assert (c[:, 1] >= left + cw / 2 - 1e-4).all() and (c[:, 1] <= left + w - cw / 2 + 1e-4).all()


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("grid", [(2, 2), (3, 5), (4, 2)])
def test_spacing_is_size_over_grid(box, grid):
    top, left, h, w = box
    gh, gw = grid
    c = _grid(cell_centers(make_geometry(*box, False), grid), gh, gw)
    dy = c[1:, :, 0] - c[:-1, :, 0]
    dx = c[:, 1:, 1] - c[:, :-1, 1]
    torch.testing.assert_close(dy, torch.full_like(dy, h / gh))
    torch.testing.assert_close(dx, torch.full_like(dx, w / gw))
    # rows share y, columns share x (a regular grid)
    torch.testing.assert_close(c[..., 0], c[:, :1, 0].expand(gh, gw))
    torch.testing.assert_close(c[..., 1], c[:1, :, 1].expand(gh, gw))


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("grid", GRIDS)
def test_first_and_last_centre(box, grid):
    top, left, h, w = box
    gh, gw = grid
    c = cell_centers(make_geometry(*box, False), grid)
    torch.testing.assert_close(c[0], torch.tensor([top + h / gh / 2, left + w / gw / 2]))
    # the last centre is half a cell from the far corner (not at the border: width/N, not /(N-1))
    torch.testing.assert_close(c[-1], torch.tensor([top + h - h / gh / 2, left + w - w / gw / 2]))


def test_hand_worked_centres():
    c = cell_centers(make_geometry(0, 0, 32, 32, False), (2, 2))
    assert c.tolist() == [[8, 8], [8, 24], [24, 8], [24, 24]]
    c = cell_centers(make_geometry(10, 20, 8, 16, False), (1, 4))
    assert c.tolist() == [[14, 22], [14, 26], [14, 30], [14, 34]]


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("grid", GRIDS)
def test_flip_reverses_columns_keeps_rows(box, grid):
    gh, gw = grid
    plain = _grid(cell_centers(make_geometry(*box, False), grid), gh, gw)
    flip = _grid(cell_centers(make_geometry(*box, True), grid), gh, gw)
    torch.testing.assert_close(flip, plain.flip(1))
    torch.testing.assert_close(flip[..., 0], plain[..., 0])


def test_flip_hand_worked():
    c = cell_centers(make_geometry(0, 0, 32, 32, True), (2, 2))
    assert c.tolist() == [[8, 24], [8, 8], [24, 24], [24, 8]]


def test_batched_leading_dims():
    torch.manual_seed(0)
    geo = torch.cat([torch.rand(2, 3, 2) * 50, torch.rand(2, 3, 2) * 30 + 1,
                     (torch.rand(2, 3, 1) > 0.5).float()], dim=-1)
    geo[0, 0, 4], geo[0, 1, 4] = 1.0, 0.0  # both flip states present
    grid = (3, 4)
    out = cell_centers(geo, grid)
    assert out.shape == (2, 3, 12, 2)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], cell_centers(geo[i, j], grid))
    sizes = cell_size(geo, grid)
    assert sizes.shape == (2, 3, 2)
    torch.testing.assert_close(sizes[..., 0], geo[..., 2] / 3)
    torch.testing.assert_close(sizes[..., 1], geo[..., 3] / 4)
    assert half_diagonal_sq(geo, grid).shape == (2, 3)


def test_half_diagonal_sq_formula():
    g = make_geometry(5, 6, 30, 12, False)
    # cell 10 x 3 -> half 5 x 1.5 -> 25 + 2.25
    assert half_diagonal_sq(g, (3, 4)).item() == pytest.approx(27.25)
    assert half_diagonal_sq(make_geometry(0, 0, 32, 32, True), (2, 2)).item() == pytest.approx(128.0)
    assert half_diagonal_sq(make_geometry(0, 0, 16, 16, False), (2, 2)).item() == pytest.approx(32.0)
    torch.testing.assert_close(cell_size(g, (3, 4)), torch.tensor([10.0, 3.0]))
