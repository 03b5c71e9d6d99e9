"""Label-free dense correspondence: do local features find the same place in two views?

For each held-out image two random crops (view A and view B) are taken with known geometry,
both at ``crops.global_size`` with a random flip and no photometric change. Each cell of A
is matched to the B cell of highest cosine similarity of backbone local features (the
prediction) and compared with the truth: the B cell whose centre is nearest to the A cell's
centre in original-image coordinates. Only A cells whose centre lies inside B's crop box
(edges included) count; elsewhere B does not show that place.

Scoring rule: predicted and true cells are compared by their grid positions (row, column) in
B's grid, in B's own (possibly flipped) layout. ``within_one`` is the fraction with Chebyshev
distance ``max(|d_row|, |d_col|) <= 1`` (the true cell or one of its 8 neighbours),
``exact`` the fraction with distance 0, ``mean_error_cells`` the mean Euclidean distance
``sqrt(d_row^2 + d_col^2)`` in B cells. ``chance_within_one`` / ``chance_exact`` are what
a uniformly random prediction would score on the same cells (the 3x3 neighbourhood clipped
at the grid border, over the number of B cells).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from glsd.config import Config
from glsd.data.geometry import HEIGHT, LEFT, TOP, WIDTH, cell_centers
from glsd.data.view_params import sample_seed
from glsd.data.views import crops_of_image
from glsd.data.sources import ImageSource
from glsd.eval.features import Device
from glsd.loss.matching import squared_distances
from glsd.models.backbone import Backbone


def correspondence_errors(feat_a: torch.Tensor, feat_b: torch.Tensor, geom_a: torch.Tensor,
                          geom_b: torch.Tensor, grid_a: tuple[int, int],
                          grid_b: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per-cell errors of the A cells that B shows.

    Args:
        feat_a: ``(N, Ha*Wa, D)`` local features of view A, row-major over its grid.
        feat_b: ``(N, Hb*Wb, D)`` local features of view B.
        geom_a, geom_b: ``(N, 5)`` crop records (top, left, height, width, flipped).
        grid_a, grid_b: ``(Ha, Wa)`` and ``(Hb, Wb)``.
    Returns:
        ``chebyshev (M,)`` long, ``euclid (M,)`` float, ``chance (M,)`` and
        ``chance_exact (M,)`` float (a random prediction's within-one and exact
        probabilities) for the M counted cells, and ``n_cells ()``, the number of A cells
        before the inside-B filter.
    """
    hb, wb = grid_b
    sim = F.normalize(feat_a.float(), dim=-1) @ F.normalize(feat_b.float(), dim=-1).transpose(1, 2)
    pred = sim.argmax(dim=-1)  # (N, Na) most similar B cell
    centers_a = cell_centers(geom_a.float(), grid_a)  # (N, Na, 2) as (y, x)
    centers_b = cell_centers(geom_b.float(), grid_b)  # (N, Nb, 2)
    true = squared_distances(centers_a, centers_b).argmin(dim=-1)  # (N, Na) nearest B cell
    inside = _inside(centers_a, geom_b.float())  # (N, Na)
    d_row = (pred // wb - true // wb).abs()
    d_col = (pred % wb - true % wb).abs()
    t_row, t_col = true // wb, true % wb
    rows = 1 + (t_row > 0).long() + (t_row < hb - 1).long()  # 3x3 block clipped at the border
    cols = 1 + (t_col > 0).long() + (t_col < wb - 1).long()
    return {"chebyshev": torch.maximum(d_row, d_col)[inside],
            "euclid": (d_row.float().pow(2) + d_col.float().pow(2)).sqrt()[inside],
            "chance": (rows * cols).float()[inside] / (hb * wb),
            "chance_exact": torch.full_like(d_row, 1, dtype=torch.float)[inside] / (hb * wb),
            "n_cells": torch.tensor(pred.numel())}


def _inside(points: torch.Tensor, geom: torch.Tensor) -> torch.Tensor:
    """``points (N, P, 2)`` (y, x) inside the box of ``geom (N, 5)`` -> ``(N, P)`` bool."""
    top, left = geom[:, TOP, None], geom[:, LEFT, None]
    bottom, right = top + geom[:, HEIGHT, None], left + geom[:, WIDTH, None]
    y, x = points[..., 0], points[..., 1]
    return (y >= top) & (y <= bottom) & (x >= left) & (x <= right)


def summarize(errors: list[dict[str, torch.Tensor]], n_images: int) -> dict:
    """Pool :func:`correspondence_errors` outputs of several batches into the report.

    Fractions are in [0, 1]; with no counted cell the scores are None.
    """
    def cat(name: str) -> torch.Tensor:
        return torch.cat([e[name] for e in errors]) if errors else torch.zeros(0)

    cheb = cat("chebyshev")
    n_cells = sum(int(e["n_cells"]) for e in errors)
    m = cheb.numel()

    def mean(t: torch.Tensor) -> Optional[float]:
        return float(t.float().mean()) if m else None

    return {"within_one": mean(cheb <= 1), "exact": mean(cheb == 0),
            "mean_error_cells": mean(cat("euclid")), "mean_chebyshev_cells": mean(cheb),
            "chance_within_one": mean(cat("chance")), "chance_exact": mean(cat("chance_exact")),
            "n_images": n_images, "n_cells": m,
            "counted_fraction": m / n_cells if n_cells else 0.0}


def dense_correspondence(feat_a: torch.Tensor, feat_b: torch.Tensor, geom_a: torch.Tensor,
                         geom_b: torch.Tensor, grid_a: tuple[int, int], grid_b: tuple[int, int]) -> dict:
    """Dense-correspondence scores of N view pairs (shapes as :func:`correspondence_errors`).

    Returns ``within_one``, ``exact``, ``chance_within_one``, ``chance_exact`` (fractions),
    ``mean_error_cells``, ``mean_chebyshev_cells``, ``n_images``, ``n_cells`` (A cells
    counted) and ``counted_fraction`` (of all A cells). See the module docstring for the rule.
    """
    errors = correspondence_errors(feat_a, feat_b, geom_a, geom_b, grid_a, grid_b)
    return summarize([errors], feat_a.shape[0])


# ----------------------------------------------------------------------------------------
# Views and the backbone pass

def view_pair(img, index: int, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two global crops of one PIL image -> views ``(3, S, S)`` x2 (normalised) and
    geometries ``(5,)`` x2, drawn by the training views' crop rule
    (:func:`glsd.data.views.crops_of_image`).

    The seed depends on ``eval.dense_seed`` and the image's index only, so an image gets the
    same pair whatever the batch size or the set of images around it.
    """
    crops = dataclasses.replace(cfg.crops, num_global=max(2, cfg.crops.num_global))
    (va, ga), (vb, gb) = crops_of_image(crops, img, sample_seed("dense", cfg.eval.dense_seed, index), [0, 1])
    mean, std = list(cfg.crops.mean), list(cfg.crops.std)
    return TF.normalize(va, mean, std), TF.normalize(vb, mean, std), ga, gb


def dense_indices(n: int, cfg: Config) -> list[int]:
    """The ``eval.dense_num_images`` images (seeded by ``eval.dense_seed``) of a source of n."""
    count = min(cfg.eval.dense_num_images, n)
    return sorted(random.Random(cfg.eval.dense_seed).sample(range(n), count))


@torch.no_grad()
def run_dense(backbone: Backbone, source: ImageSource, cfg: Config, device: Device) -> dict:
    """Dense correspondence of a backbone on held-out images of ``source``.

    Single-process (every rank computes the same thing under DDP). Returns
    :func:`summarize`'s report plus the grid and crop size used.
    """
    backbone = getattr(backbone, "module", backbone)
    device = torch.device(device)
    indices = dense_indices(len(source), cfg)
    errors, used, grid = [], 0, None
    was_training = backbone.training
    backbone.eval()
    try:
        for start in range(0, len(indices), cfg.eval.batch_size):
            pairs = _read_pairs(source, indices[start:start + cfg.eval.batch_size], cfg)
            if not pairs:
                continue
            va, vb, ga, gb = (torch.stack(t) for t in zip(*pairs))
            local = backbone(torch.cat([va, vb]).to(device)).local_feat  # (2B, gh, gw, D)
            grid = tuple(local.shape[1:3])
            fa, fb = local.flatten(1, 2).float().cpu().chunk(2)  # (B, gh*gw, D) each
            errors.append(correspondence_errors(fa, fb, ga, gb, grid, grid))
            used += len(pairs)
    finally:
        backbone.train(was_training)
    return {**summarize(errors, used), "grid": list(grid) if grid else None,
            "crop_size": cfg.crops.global_size, "global_scale": list(cfg.crops.global_scale),
            "seed": cfg.eval.dense_seed}


def _read_pairs(source: ImageSource, indices: list[int], cfg: Config):
    pairs = []
    for i in indices:
        img = source.load(source.keys[i], cfg.data.on_error)
        if img is not None:
            pairs.append(view_pair(img, i, cfg))
    return pairs
