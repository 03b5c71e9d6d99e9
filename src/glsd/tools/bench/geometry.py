"""Geometry section: analytic cell centres against a position-map baseline.

The baseline warps a ``2 x H x W`` map of pixel coordinates with the same crop
(``torchvision resized_crop`` + flip) and average-pools it to the grid.
"""
from __future__ import annotations

import random
import statistics

import torch
import torch.nn.functional as F

from glsd.config import Config
from glsd.tools.bench.common import median, ratio, time_calls


def position_map(height: int, width: int) -> torch.Tensor:
    """``(2, H, W)`` pixel-centre coordinates (y, x) of an image: the baseline's map."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                            torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    return torch.stack([yy, xx])


def position_map_centers(pos: torch.Tensor, crop: tuple[int, int, int, int], flipped: bool,
                         size: int, grid: tuple[int, int], interpolation) -> torch.Tensor:
    """The baseline: warp the map with the crop (resized_crop + flip), average-pool it to
    the grid -> ``(gh * gw, 2)`` centres (y, x), row-major like :func:`cell_centers`."""
    from torchvision.transforms import functional as TF

    top, left, h, w = crop
    view = TF.resized_crop(pos, top, left, h, w, [size, size], interpolation, antialias=True)
    if flipped:
        view = TF.hflip(view)
    return F.adaptive_avg_pool2d(view, grid).flatten(1).T


def bench_geometry(cfg: Config, quick: bool, model_grids: dict[int, tuple[int, int]]) -> dict:
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from glsd.data.geometry import cell_centers

    c = cfg.crops
    interp = InterpolationMode.BICUBIC if c.interpolation == "bicubic" else InterpolationMode.BILINEAR
    n_crops = 32 if quick else 512
    n_base = 8 if quick else 96
    reps = 3 if quick else 7
    # (name, (H, W), [(size, grid, scale)]): the preset's crops on 32 px images; the paper's
    # 224 / 96 crops with Swin-T's 7x7 / 3x3 grids on a 500 x 375 image.
    cases = [
        ("32x32", (32, 32), [(c.global_size, model_grids[c.global_size], c.global_scale),
                             (c.local_size, model_grids[c.local_size], c.local_scale)]),
        ("500x375", (375, 500), [(224, (7, 7), (0.4, 1.0)), (96, (3, 3), (0.05, 0.4))]),
    ]
    rng = random.Random(0)
    results = []
    for name, (height, width), kinds in cases:
        dummy = torch.empty(1, height, width)
        pos = position_map(height, width)
        per_kind = []
        for size, grid, scale in kinds:
            crops, flips = [], []
            torch.manual_seed(rng.randrange(2 ** 31))
            for _ in range(n_crops):
                crops.append(T.RandomResizedCrop.get_params(dummy, list(scale), list(c.ratio)))
                flips.append(rng.random() < 0.5)
            geom = torch.tensor([[*b, float(f)] for b, f in zip(crops, flips)], dtype=torch.float32)
            analytic_s = median(time_calls(lambda: cell_centers(geom, grid), reps, warmup=2))
            base = [None] * n_base

            def baseline():
                for i in range(n_base):
                    base[i] = position_map_centers(pos, crops[i], flips[i], size, grid, interp)

            base_s = median(time_calls(baseline, reps, warmup=1))
            analytic = cell_centers(geom[:n_base], grid)  # (n, N, 2)
            baseline_c = torch.stack(base)
            cell = torch.stack([geom[:n_base, 2] / grid[0], geom[:n_base, 3] / grid[1]], -1)[:, None]
            disagreement = ((analytic - baseline_c).abs() / cell).amax(-1)  # (n, N) in cells
            per_kind.append({
                "crop_size": size, "grid": list(grid), "scale": list(scale),
                "n_crops_analytic": n_crops, "n_crops_baseline": n_base,
                "analytic_us_per_crop": 1e6 * analytic_s / n_crops,
                "position_map_us_per_crop": 1e6 * base_s / n_base,
                "max_disagreement_cells": float(disagreement.max()),
                "mean_disagreement_cells": float(disagreement.mean()),
            })
        a_us = statistics.mean(k["analytic_us_per_crop"] for k in per_kind)
        b_us = statistics.mean(k["position_map_us_per_crop"] for k in per_kind)
        results.append({"source": name, "source_hw": [height, width], "crops": per_kind,
                        "analytic_us_per_crop": a_us, "position_map_us_per_crop": b_us,
                        "speedup": ratio(b_us, a_us),
                        "max_disagreement_cells": max(k["max_disagreement_cells"] for k in per_kind)})
    return {
        "baseline": f"2xHxW pixel-centre map, torchvision resized_crop ({c.interpolation}, "
                    "antialias) + hflip, adaptive_avg_pool2d to the grid; map built once per source",
        "cases": results,
        "min_speedup": min(r["speedup"] for r in results),
        "max_disagreement_cells": max(r["max_disagreement_cells"] for r in results),
    }
