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

    The ``center`` buffer is ``(1, K)``. Under a process group the batch mean is all-reduced
    over ranks; alone it is local.
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
    """logits ``(..., K)``, center ``(1, K)`` -> centred, sharpened softmax ``(..., K)`` in fp32."""
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


class SoftTargetCrossEntropy(torch.autograd.Function):
    """``-sum(target * log_softmax(logits / temp))`` over every element, as one scalar.

    The same value and gradient as autograd through ``log_softmax``, with fewer passes over
    the ``(..., K)`` tensors, which on a CPU are the local loss's cost (it is memory-bound: a
    pass per elementwise op over every cell's K outputs): the temperature divides the fp32 copy
    in place, the product with the target is a dot product (no product tensor), and the
    backward writes ``(softmax * sum_k target - target) / temp`` into one buffer.

    forward(logits ``(..., K)`` any float dtype, target ``(..., K)`` fp32 without gradient,
    temp) -> fp32 scalar; the gradient has the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, temp: float) -> torch.Tensor:
        z = logits.detach().to(torch.float32, copy=True).div_(temp)
        log_p = torch.log_softmax(z, dim=-1)
        ctx.save_for_backward(log_p, target)
        ctx.temp, ctx.logits_dtype = temp, logits.dtype
        return -torch.dot(target.reshape(-1), log_p.reshape(-1))

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises, not zeros
    def backward(ctx, grad_out: torch.Tensor):
        log_p, target = ctx.saved_tensors
        grad = log_p.exp().mul_(target.sum(-1, keepdim=True)).sub_(target)
        return grad.mul_(grad_out / ctx.temp).to(ctx.logits_dtype), None, None


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
    log-probabilities per pair. The sum is one ``embedding_bag`` over the teacher's rows, so
    no ``(P, B, Ns, K)`` copy of the matched rows is made either.
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
        probs = self.teacher_probs_then_update(teacher_logits.detach(), teacher_temp)
        n_pairs = sum(len(t_idx) for t_idx, _ in pairs)
        total = probs.new_zeros(())
        for logits, (t_idx, s_idx), match in zip(student_groups, pairs, matches):
            if len(t_idx) == 0:  # e.g. the global group with one global view: no pair, no term
                continue
            target = self.summed_targets(probs, logits.shape, t_idx, s_idx, match, n_pairs)
            total = total + SoftTargetCrossEntropy.apply(logits, target, self.student_temp)
        return total

    @torch.no_grad()
    def teacher_probs_then_update(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """:func:`teacher_probs` under the current centre, then the centre's update, sharing
        one fp32 copy of the ``(Vt, B, Nt, K)`` logits (edited in place)."""
        z = logits.to(torch.float32, copy=True)
        center = self.center.center.clone()
        self.center.update(z.flatten(0, -2))
        return torch.softmax(z.sub_(center).div_(temp), dim=-1)

    @torch.no_grad()
    def summed_targets(self, probs: torch.Tensor, student_shape: torch.Size, t_idx: torch.Tensor,
                       s_idx: torch.Tensor, match: Matches, n_pairs: int) -> torch.Tensor:
        """Per student cell, the sum over the pairs it is in of weight * matched teacher
        probabilities, with weight = valid / (cells counted per pair) / pairs.

        Args:
            probs: ``(Vt, B, Nt, K)`` teacher probabilities; student_shape: ``(Vg, B, Ns, K)``;
            t_idx, s_idx: ``(P,)`` view pairs (P >= 1); match: hard (index ``(P, B, Ns)``) or
                soft (index and weight ``(P, B, Ns, J)``: the matched probabilities are the
                J-weighted sum of teacher rows).
        Returns:
            ``(Vg, B, Ns, K)`` targets.
        """
        _, batch, n_tcells, k = probs.shape
        n_views, _, n_cells, _ = student_shape
        valid = match.valid.to(probs.dtype)  # (P, B, Ns)
        if self.normalize == "valid":
            per_pair = per_valid_cell(valid.sum((1, 2)))
        else:
            per_pair = valid.new_full((len(t_idx),), 1.0 / (batch * n_cells))
        weight = valid * (per_pair / n_pairs)[:, None, None]  # (P, B, Ns)
        sample = torch.arange(batch, device=probs.device)
        rows = (t_idx[:, None, None] * batch + sample[None, :, None]) * n_tcells  # (P, B, 1)
        if match.weight is None:
            rows, weight = (rows + match.index)[..., None], weight[..., None]
        else:
            rows = rows[..., None] + match.index  # (P, B, Ns, J)
            weight = match.weight.to(probs.dtype) * weight[..., None]
        rows, weight = bags_per_student_cell(rows, weight, s_idx, n_views)
        target = F.embedding_bag(rows, probs.reshape(-1, k), mode="sum", per_sample_weights=weight)
        return target.view(n_views, batch, n_cells, k)


def per_valid_cell(counts: torch.Tensor) -> torch.Tensor:
    """``(P,)`` valid-cell counts of this process's batch -> the weight of one cell when a
    pair's loss is its mean over valid cells: 1 / count. Under a process group the count is
    every rank's and the weight is scaled by the world size, because DistributedDataParallel
    averages the ranks' gradients: W ranks of batch B then train as one process of W * B."""
    if dist.is_available() and dist.is_initialized():
        counts = counts.clone()
        dist.all_reduce(counts)
        return dist.get_world_size() / counts.clamp(min=1.0)
    return 1.0 / counts.clamp(min=1.0)


def bags_per_student_cell(rows: torch.Tensor, weight: torch.Tensor, s_idx: torch.Tensor,
                          n_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, B, Ns, J)`` teacher rows and weights of P pairs -> ``(Vg * B * Ns, C * J)``: one
    bag per student cell with every (pair, candidate) it is compared with.

    Each view gets C = ceil(P / Vg) slots, in pair order. That is every pair when the views'
    pair counts differ by at most one, as :func:`view_pairs` makes them (a group holding every
    view: its global views skip their own teacher view); a spare slot holds row 0 at weight 0.
    A view in more than C pairs is an index error, never a silently dropped pair. Built on the
    device from shapes alone: no host sync.
    """
    n_pairs = s_idx.shape[0]
    slots = -(-n_pairs // n_views)
    onehot = F.one_hot(s_idx, n_views)  # (P, Vg)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # (P,) rank of the pair among its view's
    # A pair past its view's C slots gets an index past the end: index_copy_ fails on it
    # rather than writing into the next view's slot.
    position = torch.where(rank < slots, s_idx * slots + rank, n_views * slots)
    shape = (n_views * slots, *rows.shape[1:])
    rows = rows.new_zeros(shape).index_copy_(0, position, rows)
    weight = weight.new_zeros(shape).index_copy_(0, position, weight)
    bag = slots * rows.shape[-1]
    return (rows.view(n_views, slots, *shape[1:]).permute(0, 2, 3, 1, 4).reshape(-1, bag),
            weight.view(n_views, slots, *shape[1:]).permute(0, 2, 3, 1, 4).reshape(-1, bag))
