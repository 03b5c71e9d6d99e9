"""Local matching: which teacher cell each student cell is compared with.

Pure functions on tensors, batched over any leading dims (view pairs x batch). Shapes use
Ns student cells, Nt teacher cells, D feature channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from glsd.data.geometry import cell_centers, half_diagonal_sq


@dataclass
class Matches:
    index: torch.Tensor  # (..., Ns) long: matched teacher cell per student cell
    valid: torch.Tensor  # (..., Ns) bool: the match counts in the loss


def geometric_match(student_centers: torch.Tensor, teacher_centers: torch.Tensor,
                    threshold_sq: Optional[torch.Tensor]) -> tuple[Matches, torch.Tensor]:
    """Nearest teacher cell in original-image coordinates.

    Args:
        student_centers: ``(..., Ns, 2)`` cell centres (y, x) of the student view.
        teacher_centers: ``(..., Nt, 2)`` cell centres of the teacher view (same image).
        threshold_sq: ``(...)`` squared distance at or beyond which a match is ignored,
            or None to keep every match.
    Returns:
        Matches, and ``(..., Ns)`` squared distance of each student cell to its match.
    """
    d2 = squared_distances(student_centers, teacher_centers)  # (..., Ns, Nt)
    dist_sq, index = d2.min(dim=-1)
    if threshold_sq is None:
        valid = torch.ones_like(index, dtype=torch.bool)
    else:
        valid = dist_sq < threshold_sq[..., None]
    return Matches(index, valid), dist_sq


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., Na, 2), (..., Nb, 2) -> (..., Na, Nb); exact (no expansion-trick cancellation).
    Per coordinate: a sum over a last dim of size 2 is a slow reduction on a CPU."""
    dy = a[..., :, None, 0] - b[..., None, :, 0]
    dx = a[..., :, None, 1] - b[..., None, :, 1]
    return dy * dy + dx * dx


def similarity_match(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> Matches:
    """EsViT's matching: the teacher cell of highest cosine similarity of backbone features.

    Args:
        student_feat: ``(..., Ns, D)``; teacher_feat: ``(..., Nt, D)``.
    Returns:
        Matches with every match valid (no threshold).
    """
    s = F.normalize(student_feat.float(), dim=-1)
    t = F.normalize(teacher_feat.float(), dim=-1)
    index = torch.matmul(s, t.transpose(-1, -2)).argmax(dim=-1)
    return Matches(index, torch.ones_like(index, dtype=torch.bool))


def match_threshold_sq(student_geom: torch.Tensor, student_grid: tuple[int, int],
                       teacher_geom: torch.Tensor, teacher_grid: tuple[int, int],
                       threshold: Union[str, float, None]) -> Optional[torch.Tensor]:
    """Per-sample squared threshold ``(...)``.

    ``half_diagonal``: the larger of the student's and the teacher's squared half cell
    diagonal (the original's rule); a number: that distance in pixels; None / "none": off.
    """
    if threshold is None or threshold == "none":
        return None
    if threshold == "half_diagonal":
        return torch.maximum(half_diagonal_sq(student_geom, student_grid),
                             half_diagonal_sq(teacher_geom, teacher_grid))
    return torch.full(student_geom.shape[:-1], float(threshold) ** 2, device=student_geom.device)


@dataclass
class PairMatching:
    """Matches of a group of (teacher view, student view) pairs, plus diagnostics."""
    matches: Matches  # index/valid (P, B, Ns)
    stats: dict[str, torch.Tensor]  # scalar diagnostics


@torch.no_grad()
def match_pairs(mode: str, threshold, student_geom: torch.Tensor, student_grid: tuple[int, int],
                teacher_geom: torch.Tensor, teacher_grid: tuple[int, int],
                student_feat: Optional[torch.Tensor], teacher_feat: Optional[torch.Tensor],
                diagnostics: bool = True) -> PairMatching:
    """Match P view pairs at once.

    Args:
        mode: "geometric" or "similarity" (which matches the loss uses). With
            ``diagnostics`` both are computed, so the statistics describe how the two would
            differ whatever the mode; without, only the one the loss needs (stats empty).
        student_geom, teacher_geom: ``(P, B, 5)`` crop records of the paired views.
        student_feat: ``(P, B, Ns, D)``; teacher_feat: ``(P, B, Nt, D)`` backbone features
            (may be None for geometric matching without diagnostics).
    Returns:
        PairMatching with ``(P, B, Ns)`` matches and diagnostics:
        ``geo_valid_frac`` (student cells with a geometric match under the threshold),
        ``sim_geo_agree`` (similarity match == geometric match, among geometrically valid
        cells) and ``sim_dist_cells`` (distance from a student cell's centre to its
        similarity-matched teacher cell's centre, in teacher cell sizes).
    """
    if not diagnostics and mode == "similarity":
        return PairMatching(similarity_match(student_feat, teacher_feat), {})
    s_centers = cell_centers(student_geom, student_grid)  # (P, B, Ns, 2)
    t_centers = cell_centers(teacher_geom, teacher_grid)  # (P, B, Nt, 2)
    thr = match_threshold_sq(student_geom, student_grid, teacher_geom, teacher_grid, threshold)
    geo, _ = geometric_match(s_centers, t_centers, thr)
    if not diagnostics:
        return PairMatching(geo, {})
    sim = similarity_match(student_feat, teacher_feat)
    t_cell = (teacher_geom[..., 2] / teacher_grid[0] * teacher_geom[..., 3] / teacher_grid[1]).sqrt()
    sim_xy = torch.gather(t_centers, -2, sim.index[..., None].expand(*sim.index.shape, 2))
    sim_dist = (sim_xy - s_centers).pow(2).sum(-1).sqrt() / t_cell[..., None]
    valid = geo.valid.float()
    stats = {
        "geo_valid_frac": valid.mean(),
        "sim_geo_agree": ((sim.index == geo.index).float() * valid).sum() / valid.sum().clamp(min=1),
        "sim_dist_cells": sim_dist.mean(),
    }
    return PairMatching(geo if mode == "geometric" else sim, stats)
