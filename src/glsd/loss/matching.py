"""Local matching: which teacher cell(s) each student cell is compared with.

Pure functions on tensors, batched over any leading dims (view pairs x batch). Shapes use
Ns student cells, Nt teacher cells, D feature channels, J candidate cells per student cell.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from glsd.data.geometry import FLIP, HEIGHT, LEFT, TOP, WIDTH, cell_centers, half_diagonal_sq

MODES = ("geometric", "similarity", "soft_geometric", "hybrid")


@dataclass
class Matches:
    """Hard matches (``weight`` None): ``index`` ``(..., Ns)``, one teacher cell per student
    cell. Soft matches: ``index`` and ``weight`` ``(..., Ns, J)``, the target is the
    weighted sum of J teacher cells (weights sum to 1 per student cell)."""
    index: torch.Tensor  # (..., Ns) or (..., Ns, J) long: matched teacher cell(s)
    valid: torch.Tensor  # (..., Ns) bool: the match counts in the loss
    weight: Optional[torch.Tensor] = None  # (..., Ns, J) float, or None for a hard match


def geometric_match(student_centers: torch.Tensor, teacher_centers: torch.Tensor,
                    threshold_sq: Optional[torch.Tensor]) -> tuple[Matches, torch.Tensor]:
    """Nearest teacher cell in original-image coordinates, from the whole distance table: the
    reference :func:`nearest_cell_match` (what training and the pictures use) is tested against.

    Args:
        student_centers: ``(..., Ns, 2)`` cell centres (y, x) of the student view.
        teacher_centers: ``(..., Nt, 2)`` cell centres of the teacher view (same image).
        threshold_sq: ``(...)`` squared distance at or beyond which a match is ignored,
            or None to keep every match.
    Returns:
        Matches, and ``(..., Ns)`` squared distance of each student cell to its match.
    """
    return nearest_match(squared_distances(student_centers, teacher_centers), threshold_sq)


def nearest_match(d2: torch.Tensor, threshold_sq: Optional[torch.Tensor]) -> tuple[Matches, torch.Tensor]:
    """``d2`` ``(..., Ns, Nt)`` squared centre distances -> geometric_match's result."""
    dist_sq, index = d2.min(dim=-1)
    return Matches(index, within(dist_sq, threshold_sq)), dist_sq


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., Na, 2), (..., Nb, 2) -> (..., Na, Nb); exact (no expansion-trick cancellation).
    Per coordinate: a sum over a last dim of size 2 is a slow reduction on a CPU."""
    dy = a[..., :, None, 0] - b[..., None, :, 0]
    dx = a[..., :, None, 1] - b[..., None, :, 1]
    return dy * dy + dx * dx


def cosine_similarities(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """``(..., Ns, D)``, ``(..., Nt, D)`` -> ``(..., Ns, Nt)`` cosine similarity (fp32)."""
    s = F.normalize(student_feat.float(), dim=-1)
    t = F.normalize(teacher_feat.float(), dim=-1)
    return torch.matmul(s, t.transpose(-1, -2))


def pair_similarities(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                      t_idx: torch.Tensor, s_idx: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of view pairs, from per-view features.

    Each view is normalised once. When the pairs are every (teacher, student) combination (the
    local views: each meets every teacher view), all of them come from one product per sample:
    a product per pair would be P * B tiny matrix products, several times slower on a CPU.
    Otherwise (the global views skip their own teacher view) each pair's features are gathered
    and multiplied, so that no product is made that no pair needs (on a 28 x 28 grid the
    unneeded ones would cost hundreds of MB).

    Args:
        student_feat: ``(Vs, B, Ns, D)``; teacher_feat: ``(Vt, B, Nt, D)``;
        t_idx, s_idx: ``(P,)`` the pairs' teacher and student views.
    Returns:
        ``(P, B, Ns, Nt)`` fp32, ``cosine_similarities`` of each pair's features.
    """
    s = F.normalize(student_feat.float(), dim=-1)
    t = F.normalize(teacher_feat.float(), dim=-1)
    n_teacher, n_student = t.shape[0], s.shape[0]
    if len(t_idx) == n_teacher * n_student:  # as many pairs as combinations: one product each
        every = torch.einsum("sbnd,tbmd->tsbnm", s, t).flatten(0, 1)  # (Vt * Vs, B, Ns, Nt)
        return every[t_idx * n_student + s_idx]
    return torch.matmul(s[s_idx], t[t_idx].transpose(-1, -2))


def similarity_match(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> Matches:
    """EsViT's matching: the teacher cell of highest cosine similarity of backbone features.

    Args:
        student_feat: ``(..., Ns, D)``; teacher_feat: ``(..., Nt, D)``.
    Returns:
        Matches with every match valid (no threshold).
    """
    return most_similar(cosine_similarities(student_feat, teacher_feat))


def most_similar(sim: torch.Tensor) -> Matches:
    """``(..., Ns, Nt)`` similarities -> the argmax teacher cell, every match valid."""
    index = sim.argmax(dim=-1)
    return Matches(index, torch.ones_like(index, dtype=torch.bool))


def grid_coordinates(points: torch.Tensor, teacher_geom: torch.Tensor,
                     teacher_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (row, column) position of original-image points in a view's cell grid.

    ``u = (y - top) / h * gh - 0.5``, ``v = (x - left) / w * gw - 0.5``, mirrored
    ``v -> gw - 1 - v`` for a flipped view: integer values are cell centres.

    Args:
        points: ``(..., Ns, 2)`` (y, x); teacher_geom: ``(..., 5)`` crop records.
    Returns:
        ``(..., Ns)`` u and v, unclamped.
    """
    gh, gw = teacher_grid
    g = teacher_geom.float()[..., None, :]  # (..., 1, 5)
    u = (points[..., 0] - g[..., TOP]) / g[..., HEIGHT] * gh - 0.5
    v = (points[..., 1] - g[..., LEFT]) / g[..., WIDTH] * gw - 0.5
    return u, torch.where(g[..., FLIP] > 0.5, (gw - 1) - v, v)


def nearest_cell_match(student_centers: torch.Tensor, teacher_geom: torch.Tensor,
                       teacher_grid: tuple[int, int],
                       threshold_sq: Optional[torch.Tensor]) -> tuple[Matches, torch.Tensor]:
    """:func:`geometric_match` without the ``(Ns, Nt)`` distance table.

    Teacher cell centres form a product grid, so the squared distance is a row term plus a
    column term and the nearest cell is the nearest row and the nearest column: each is the
    rounded, clamped grid coordinate, a tie going to the lower index as ``min`` does over the
    row-major table. The distance is taken to that cell's centre from :func:`cell_centers` as
    :func:`squared_distances` takes it, so validity agrees with the table bit for bit; only a
    tie within float rounding (two cells equally near to ~1e-7 pixel) may pick the other one.

    Args:
        student_centers: ``(..., Ns, 2)`` cell centres (y, x); teacher_geom: ``(..., 5)``.
        threshold_sq: ``(...)`` or None, as for :func:`geometric_match`.
    Returns:
        Matches, and ``(..., Ns)`` squared distance of each student cell to its match.
    """
    gh, gw = teacher_grid
    u, v = grid_coordinates(student_centers, teacher_geom, teacher_grid)
    row = torch.ceil(u - 0.5).clamp_(0, gh - 1).long()  # round half down: a tie to the lower index
    col = torch.ceil(v - 0.5).clamp_(0, gw - 1).long()
    index = row * gw + col
    t_centers = cell_centers(teacher_geom, teacher_grid)  # (..., Nt, 2): the table's own centres
    matched = torch.gather(t_centers, -2, index[..., None].expand(*index.shape, 2))
    dy = student_centers[..., 0] - matched[..., 0]
    dx = student_centers[..., 1] - matched[..., 1]
    dist_sq = dy * dy + dx * dx
    return Matches(index, within(dist_sq, threshold_sq)), dist_sq


def within(dist_sq: torch.Tensor, threshold_sq: Optional[torch.Tensor]) -> torch.Tensor:
    """``(..., Ns)`` validity of matches at ``dist_sq``: strictly under the per-sample
    ``(...)`` squared threshold, or all valid without one."""
    if threshold_sq is None:
        return torch.ones_like(dist_sq, dtype=torch.bool)
    return dist_sq < threshold_sq[..., None]


def soft_geometric_match(student_centers: torch.Tensor, teacher_geom: torch.Tensor,
                         teacher_grid: tuple[int, int], valid: torch.Tensor) -> Matches:
    """Bilinear interpolation of the teacher grid at each student cell centre.

    The centre's continuous position in the teacher grid (:func:`grid_coordinates`) is
    clamped to the grid; the 4 surrounding cells get the bilinear weights.

    Args:
        student_centers: ``(..., Ns, 2)`` (y, x); teacher_geom: ``(..., 5)`` crop records;
        valid: ``(..., Ns)`` the validity to keep (the geometric arm's).
    Returns:
        Matches with ``index`` and ``weight`` ``(..., Ns, 4)``.
    """
    gh, gw = teacher_grid
    u, v = grid_coordinates(student_centers, teacher_geom, teacher_grid)
    u, v = u.clamp(0, gh - 1), v.clamp(0, gw - 1)
    u0, v0 = u.floor(), v.floor()
    fu, fv = u - u0, v - v0  # 0 on the last row / column: the "+1" neighbour weighs nothing
    u0, v0 = u0.long(), v0.long()
    u1, v1 = (u0 + 1).clamp(max=gh - 1), (v0 + 1).clamp(max=gw - 1)
    index = torch.stack([u0 * gw + v0, u0 * gw + v1, u1 * gw + v0, u1 * gw + v1], dim=-1)
    weight = torch.stack([(1 - fu) * (1 - fv), (1 - fu) * fv, fu * (1 - fv), fu * fv], dim=-1)
    return Matches(index, valid, weight)


def hybrid_match(d2: torch.Tensor, sim: torch.Tensor, candidates: int,
                 geometric: Matches) -> Matches:
    """Among the ``candidates`` geometrically nearest teacher cells, the most similar one.

    Args:
        d2: ``(..., Ns, Nt)`` squared centre distances; sim: ``(..., Ns, Nt)`` cosine
            similarities; geometric: the geometric arm's matches, whose validity is kept.
    Returns:
        Hard Matches ``(..., Ns)``; with one candidate exactly the geometric matches.
    """
    k = min(candidates, d2.shape[-1])
    if k == 1:  # the nearest cell itself (the same tie-break as the geometric arm)
        return Matches(geometric.index, geometric.valid)
    near = d2.topk(k, dim=-1, largest=False).indices  # (..., Ns, k)
    best = torch.gather(sim, -1, near).argmax(dim=-1, keepdim=True)
    return Matches(torch.gather(near, -1, best)[..., 0], geometric.valid)


def match_threshold_sq(student_geom: torch.Tensor, student_grid: tuple[int, int],
                       teacher_geom: torch.Tensor, teacher_grid: tuple[int, int],
                       threshold: Union[str, float, None]) -> Optional[torch.Tensor]:
    """Per-sample squared threshold ``(...)`` of the pairs' crop records ``(..., 5)``.

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
    matches: Matches  # index/valid (P, B, Ns); soft: index/weight (P, B, Ns, J)
    stats: dict[str, torch.Tensor]  # scalar diagnostics


def needs_similarities(mode: str, diagnostics: bool) -> bool:
    """Whether match_pairs reads feature similarities for this mode."""
    return diagnostics or mode in ("similarity", "hybrid")


@torch.no_grad()
def match_pairs(mode: str, threshold, student_geom: torch.Tensor, student_grid: tuple[int, int],
                teacher_geom: torch.Tensor, teacher_grid: tuple[int, int],
                sim: Optional[torch.Tensor], diagnostics: bool = True,
                candidates: int = 4) -> PairMatching:
    """Match P view pairs at once.

    Args:
        mode: one of MODES (which matches the loss uses). With ``diagnostics`` geometric
            and similarity matches are both computed, so the statistics describe how the
            two would differ whatever the mode; without, only what the mode needs.
        student_geom, teacher_geom: ``(P, B, 5)`` crop records of the paired views.
        sim: ``(P, B, Ns, Nt)`` cosine similarities of the pairs' backbone features
            (:func:`pair_similarities`; may be None when ``needs_similarities`` is false).
        candidates: hybrid only, how many nearest teacher cells compete on similarity.
    Returns:
        PairMatching with ``(P, B, Ns)`` matches (soft_geometric: ``(P, B, Ns, 4)`` index
        and weight) and diagnostics:
        ``geo_valid_frac`` (student cells with a geometric match under the threshold),
        ``sim_geo_agree`` (similarity match == geometric match, among geometrically valid
        cells) and ``sim_dist_cells`` (distance from a student cell's centre to its
        similarity-matched teacher cell's centre, in teacher cell sizes).
    """
    if mode not in MODES:
        raise ValueError(f"matching mode {mode!r}: use one of {', '.join(MODES)}")
    if not diagnostics and mode == "similarity":  # no geometry needed
        return PairMatching(most_similar(sim), {})
    s_centers = cell_centers(student_geom, student_grid)  # (P, B, Ns, 2)
    thr = match_threshold_sq(student_geom, student_grid, teacher_geom, teacher_grid, threshold)
    geo, _ = nearest_cell_match(s_centers, teacher_geom, teacher_grid, thr)
    if mode == "soft_geometric":
        chosen = soft_geometric_match(s_centers, teacher_geom, teacher_grid, geo.valid)
    elif mode == "hybrid":  # the k nearest cells: the one mode that needs the distance table
        d2 = squared_distances(s_centers, cell_centers(teacher_geom, teacher_grid))
        chosen = hybrid_match(d2, sim, candidates, geo)
    elif mode == "similarity":
        chosen = most_similar(sim)
    else:
        chosen = geo
    if not diagnostics:
        return PairMatching(chosen, {})
    return PairMatching(chosen, _diagnostics(geo, sim.argmax(dim=-1), s_centers,
                                             cell_centers(teacher_geom, teacher_grid),
                                             teacher_geom, teacher_grid))


def _diagnostics(geo: Matches, sim_index: torch.Tensor, s_centers: torch.Tensor,
                 t_centers: torch.Tensor, teacher_geom: torch.Tensor,
                 teacher_grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """How the similarity matches ``(P, B, Ns)`` relate to the geometric ones (scalars)."""
    t_cell = (teacher_geom[..., HEIGHT] / teacher_grid[0] * teacher_geom[..., WIDTH] / teacher_grid[1]).sqrt()
    sim_xy = torch.gather(t_centers, -2, sim_index[..., None].expand(*sim_index.shape, 2))
    sim_dist = (sim_xy - s_centers).pow(2).sum(-1).sqrt() / t_cell[..., None]
    valid = geo.valid.float()
    return {
        "geo_valid_frac": valid.mean(),
        "sim_geo_agree": ((sim_index == geo.index).float() * valid).sum() / valid.sum().clamp(min=1),
        "sim_dist_cells": sim_dist.mean(),
    }
