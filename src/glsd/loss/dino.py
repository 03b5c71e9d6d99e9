"""DINO losses: the global (view-level) term and the local (cell-level) term.

Views are numbered student-side: the ``Vt`` global views first (these are also the teacher's
views, teacher view ``t`` == student view ``t``), then the local views. Every
(teacher view t, student view s != t) pair contributes; each term is averaged over its pairs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glsd.loss.matching import Matches


class Center(nn.Module):
    """EMA of the teacher's mean output, subtracted before sharpening (prevents collapse).

    Under a process group the batch mean is all-reduced over ranks; alone it is local.
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """teacher_logits: ``(N, K)`` (all views, samples and cells flattened)."""
        total = teacher_logits.float().sum(dim=0, keepdim=True)
        if dist.is_available() and dist.is_initialized():
            count = total.new_full((1,), float(teacher_logits.shape[0]))
            dist.all_reduce(total)
            dist.all_reduce(count)
            mean = total / count
        else:  # alone, divide by the Python int: no count tensor to build on the device
            mean = total / teacher_logits.shape[0]
        self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)


def teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centred, sharpened softmax ``(..., K)``; computed in fp32."""
    return F.softmax((logits.float() - center) / temp, dim=-1)


class DINOGlobalLoss(nn.Module):
    """Cross-entropy between teacher and student view-level outputs.

    forward(student_logits ``(Vs, B, K)``, teacher_logits ``(Vt, B, K)``, teacher_temp) ->
    scalar: mean over the ``Vt * Vs - Vt`` pairs (s != t) of the batch-mean of
    ``-sum_k p_t[k] * log_softmax(s / student_temp)[k]``.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center = Center(out_dim, center_momentum)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        n_teacher, n_student = teacher_logits.shape[0], student_logits.shape[0]
        probs = teacher_probs(teacher_logits.detach(), self.center.center, teacher_temp)
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        ce = -torch.einsum("tbk,sbk->tsb", probs, log_p).mean(-1)  # (Vt, Vs)
        same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=ce.device)
        loss = ce.masked_fill(same_view, 0.0).sum() / (n_teacher * n_student - n_teacher)
        self.center.update(teacher_logits.detach().flatten(0, -2))
        return loss


def view_pairs(num_teacher: int, first_view: int, num_views: int,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) index pairs between teacher views and student views ``first_view..+num_views``
    with ``s != t``; ``s`` is returned relative to ``first_view``. Shapes ``(P,)``."""
    t = torch.arange(num_teacher).repeat_interleave(num_views)
    s = torch.arange(num_views).repeat(num_teacher)
    keep = t != s + first_view
    return t[keep].to(device), s[keep].to(device)


class DINOLocalLoss(nn.Module):
    """Cross-entropy between each student cell and its matched teacher cell.

    forward(student_groups, teacher_logits, pairs, matches, teacher_temp) -> scalar
      - student_groups: list of ``(Vg, B, Ns, K)`` local logits, one per view size;
      - teacher_logits: ``(Vt, B, Nt, K)``;
      - pairs: per group, ``(t_idx, s_idx)`` of shape ``(P,)`` (``s_idx`` within the group);
      - matches: per group, Matches with ``(P, B, Ns)`` index into Nt and validity, or
        soft Matches whose ``(P, B, Ns, J)`` index / weight give each target as a weighted
        sum of J teacher cells.
    Per pair the loss is the batch mean of ``sum_cells valid * CE / Ns`` (``normalize="all"``,
    the original: unmatched cells count as zero) or the mean over valid cells
    (``normalize="valid"``); the loss is the mean over all pairs of all groups.

    The loss is linear in the targets, so each group's matched teacher probabilities, times
    their weights, are summed per student cell first (no gradient flows there): everything
    that carries a gradient is ``(Vg, B, Ns, K)``, never one copy of the student's
    log-probabilities per pair. The one ``(P, B, Ns, K)`` tensor per group is the gathered
    teacher targets (a soft match fills it one candidate at a time).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 normalize: str = "all"):
        super().__init__()
        self.student_temp = student_temp
        self.normalize = normalize
        self.center = Center(out_dim, center_momentum)

    def forward(self, student_groups: list[torch.Tensor], teacher_logits: torch.Tensor,
                pairs: list[tuple[torch.Tensor, torch.Tensor]], matches: list[Matches],
                teacher_temp: float) -> torch.Tensor:
        probs = teacher_probs(teacher_logits.detach(), self.center.center, teacher_temp)
        n_pairs = sum(len(t_idx) for t_idx, _ in pairs)
        total = probs.new_zeros(())
        for logits, (t_idx, s_idx), match in zip(student_groups, pairs, matches):
            target = self.summed_targets(probs, logits.shape, t_idx, s_idx, match, n_pairs)
            log_p = F.log_softmax(logits.float() / self.student_temp, dim=-1)
            total = total - (target * log_p).sum()
        self.center.update(teacher_logits.detach().flatten(0, -2))
        return total

    @torch.no_grad()
    def summed_targets(self, probs: torch.Tensor, student_shape: torch.Size, t_idx: torch.Tensor,
                       s_idx: torch.Tensor, match: Matches, n_pairs: int) -> torch.Tensor:
        """Per student cell, the sum over the pairs it is in of weight * matched teacher
        probabilities, with weight = valid / (cells counted per pair) / pairs.

        Args:
            probs: ``(Vt, B, Nt, K)`` teacher probabilities; student_shape: ``(Vg, B, Ns, K)``;
            t_idx, s_idx: ``(P,)`` view pairs; match: hard (index ``(P, B, Ns)``) or soft
                (index and weight ``(P, B, Ns, J)``: the matched probabilities are the
                J-weighted sum of teacher rows).
        Returns:
            ``(Vg, B, Ns, K)`` targets. A soft match adds one candidate at a time into the
            ``(P, B, Ns, K)`` buffer: at most two such tensors live, whatever J.
        """
        _, batch, n_tcells, k = probs.shape
        n_views, _, n_cells, _ = student_shape
        if len(t_idx) == 0:  # e.g. the global group with one global view: no pair, no term
            return probs.new_zeros(n_views, batch, n_cells, k)
        valid = match.valid.to(probs.dtype)  # (P, B, Ns)
        if self.normalize == "valid":
            per_pair = 1.0 / valid.sum((1, 2)).clamp(min=1.0)
        else:
            per_pair = valid.new_full((len(t_idx),), 1.0 / (batch * n_cells))
        cell_weight = valid * (per_pair / n_pairs)[:, None, None]  # (P, B, Ns)
        sample = torch.arange(batch, device=probs.device)
        base = (t_idx[:, None, None] * batch + sample[None, :, None]) * n_tcells  # (P, B, 1)
        flat = probs.reshape(-1, k)
        if match.weight is None:
            weighted = flat[base + match.index].mul_(cell_weight[..., None])  # (P, B, Ns, K)
        else:
            rows = base[..., None] + match.index  # (P, B, Ns, J)
            cand_weight = match.weight.to(probs.dtype) * cell_weight[..., None]
            weighted = flat[rows[..., 0]].mul_(cand_weight[..., 0, None])
            for j in range(1, rows.shape[-1]):
                weighted.addcmul_(flat[rows[..., j]], cand_weight[..., j, None])
        target = probs.new_zeros(n_views, batch * n_cells * k)
        return target.index_add_(0, s_idx, weighted.view(len(s_idx), -1)).view(n_views, batch, n_cells, k)
