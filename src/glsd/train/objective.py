"""The training objective: network outputs + crop geometry -> matching -> loss terms.

This is the one place that knows how views pair up: student views are the global views
followed by the local views; the teacher sees the global views; every (teacher view t,
student view s != t) pair contributes a global and (optionally) a local term.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from glsd.config import Config, LossConfig
from glsd.loss.dino import DINOGlobalLoss, DINOLocalLoss, view_pairs
from glsd.loss.matching import match_pairs, needs_similarities, pair_similarities
from glsd.models.heads import ViewGroupOutput


@dataclass
class LossTerms:
    loss: torch.Tensor  # weighted total, the one to back-propagate
    loss_global: torch.Tensor
    loss_local: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    # The loss read on the host once a step, by the finiteness check before backward: the
    # console reuses it rather than wait (on a GPU) for the optimizer step to read it again.
    loss_value: Optional[float] = None

    def as_floats(self) -> dict[str, float]:
        out = {"loss": self.loss.item(), "loss_global": self.loss_global.item(),
               "loss_local": self.loss_local.item()}
        out.update({k: v.item() for k, v in self.diagnostics.items()})
        return out


class GlobalLocalObjective(nn.Module):
    """Owns both losses (and their centres, which are part of the training state)."""

    def __init__(self, lc: LossConfig, out_dim: int, local_out_dim: int):
        """lc: the ``loss`` section; out_dim / local_out_dim: the heads' prototype counts."""
        super().__init__()
        self.matching = lc.matching
        self.threshold = lc.match_threshold
        self.candidates = lc.hybrid_candidates
        self.global_loss = DINOGlobalLoss(out_dim, lc.student_temp, lc.center_momentum)
        self.local_loss = None
        if lc.matching != "none":
            self.local_loss = DINOLocalLoss(local_out_dim, lc.student_temp, lc.center_momentum,
                                            lc.local_normalize)
        default_global = 1.0 if lc.matching == "none" else 0.5
        self.global_weight = default_global if lc.global_weight is None else lc.global_weight
        self.local_weight = 0.5 if lc.local_weight is None else lc.local_weight

    @classmethod
    def from_config(cls, cfg: Config) -> "GlobalLocalObjective":
        return cls(cfg.loss, cfg.model.out_dim, cfg.model.local_out_dim or cfg.model.out_dim)

    def forward(self, student: list[ViewGroupOutput], teacher: list[ViewGroupOutput],
                geometry: torch.Tensor, teacher_temp: float, diagnostics: bool = True) -> LossTerms:
        """student: output groups (global views, then local views); teacher: one group of
        the Vt global views; geometry: ``(V, B, 5)`` crop records of all student views."""
        (t_out,) = teacher
        student_global = torch.cat([g.global_logits for g in student])  # (Vs, B, K)
        loss_global = self.global_loss(student_global, t_out.global_logits, teacher_temp)
        need_matches = self.local_loss is not None or diagnostics
        pairs, matches, stats = (self.match(student, t_out, geometry, diagnostics) if need_matches
                                 else ([], [], {}))
        if self.local_loss is None:
            loss_local = torch.zeros((), device=loss_global.device)
            loss = self.global_weight * loss_global
        else:
            groups = [g.local_logits for g in student]
            loss_local = self.local_loss(groups, t_out.local_logits, pairs, matches, teacher_temp)
            loss = self.global_weight * loss_global + self.local_weight * loss_local
        return LossTerms(loss, loss_global.detach(), loss_local.detach(), stats)

    @torch.no_grad()
    def match(self, student: list[ViewGroupOutput], t_out: ViewGroupOutput, geometry: torch.Tensor,
              diagnostics: bool = True):
        """Per student group: view pairs, matches ``(P, B, Ns)`` (soft_geometric: index and
        weight ``(P, B, Ns, 4)``) and pooled diagnostics
        (computed only when asked: the second matching costs as much as the first)."""
        n_teacher = t_out.global_logits.shape[0]
        pairs, matches, stats_sum, total_pairs = [], [], {}, 0
        first = 0
        for group in student:
            n_views = group.global_logits.shape[0]
            t_idx, s_idx = view_pairs(n_teacher, first, n_views, geometry.device)
            mode = self.matching if self.matching != "none" else "geometric"
            sim = (pair_similarities(group.local_feat.detach(), t_out.local_feat, t_idx, s_idx)
                   if needs_similarities(mode, diagnostics) else None)
            result = match_pairs(mode, self.threshold,
                                 geometry[first + s_idx], group.grid, geometry[t_idx], t_out.grid,
                                 sim, diagnostics, self.candidates)
            pairs.append((t_idx, s_idx))
            matches.append(result.matches)
            # Weight each group by its pair count; a group with none (one global view) has
            # means of nothing (NaN): it adds nothing, not NaN * 0.
            for k, v in (result.stats.items() if len(t_idx) else ()):
                stats_sum[k] = stats_sum.get(k, 0.0) + v * len(t_idx)
            total_pairs += len(t_idx)
            first += n_views
        stats = {k: v / max(total_pairs, 1) for k, v in stats_sum.items()}
        return pairs, matches, stats
