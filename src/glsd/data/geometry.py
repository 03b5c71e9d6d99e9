"""Crop geometry: where each feature-map cell of a view lies in the original image.

A view's geometry is a float tensor ``(..., 5)``: ``top, left, height, width, flipped`` of
the crop box in original-image pixels, and whether the view was flipped horizontally.
Cell centres follow analytically: a crop of width ``w`` seen as ``gw`` columns has columns
of width ``w / gw`` whose centres lie at ``left + (j + 0.5) * w / gw``; a horizontal flip
reverses the column order. No coordinate map is ever warped (the original code warps a
10000 x 10000 pixel map per crop; this is the closed form of the same quantity).
"""
from __future__ import annotations

import torch

TOP, LEFT, HEIGHT, WIDTH, FLIP = range(5)


def make_geometry(top: float, left: float, height: float, width: float, flipped: bool) -> torch.Tensor:
    """The ``(5,)`` geometry record of one crop."""
    return torch.tensor([top, left, height, width, float(flipped)], dtype=torch.float32)


def cell_centers(geometry: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Centres of a view's grid cells in original-image coordinates.

    Args:
        geometry: ``(..., 5)`` crop records (top, left, height, width, flipped).
        grid_hw: ``(gh, gw)``, the feature grid of the view.
    Returns:
        ``(..., gh * gw, 2)`` centres as ``(y, x)`` pixels, row-major over the grid, i.e. in
        the order of the backbone's flattened local tokens of the (possibly flipped) view.
    """
    gh, gw = grid_hw
    g = geometry.float()
    rows = (torch.arange(gh, device=g.device, dtype=g.dtype) + 0.5) / gh  # (gh,) in (0, 1)
    cols = (torch.arange(gw, device=g.device, dtype=g.dtype) + 0.5) / gw  # (gw,)
    flipped = g[..., FLIP, None] > 0.5  # (..., 1)
    cols = torch.where(flipped, 1.0 - cols, cols)  # (..., gw): a flip mirrors the columns
    y = g[..., TOP, None] + rows * g[..., HEIGHT, None]  # (..., gh)
    x = g[..., LEFT, None] + cols * g[..., WIDTH, None]  # (..., gw)
    yy = y[..., :, None].expand(*y.shape, gw)  # (..., gh, gw)
    xx = x[..., None, :].expand(*x.shape[:-1], gh, gw)
    return torch.stack([yy, xx], dim=-1).flatten(-3, -2)


def cell_size(geometry: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Crop records ``(..., 5)`` -> ``(..., 2)`` height and width of one cell of the view's
    ``grid_hw`` grid, in original-image pixels."""
    gh, gw = grid_hw
    return torch.stack([geometry[..., HEIGHT] / gh, geometry[..., WIDTH] / gw], dim=-1)


def half_diagonal_sq(geometry: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Crop records ``(..., 5)`` -> ``(...)`` squared half-diagonal of a cell:
    ``(h/2)^2 + (w/2)^2``."""
    return (cell_size(geometry, grid_hw) / 2).pow(2).sum(-1)
