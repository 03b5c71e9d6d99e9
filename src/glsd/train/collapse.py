"""Collapse indicators, computed on logging steps and written to metrics.jsonl.

DINO collapses in two ways (dino #61, #246; dinov2 #407): every image onto one prototype
(the teacher's batch-mean distribution concentrates: few *effective prototypes*), or every
output uniform (the teacher's per-image entropy reaches log K). Either way the backbone stops
telling images apart: the per-dimension std of its L2-normalised features goes to zero.
Under torchrun they are the global batch's: the batch-mean distribution and the feature
moments are summed over ranks first (the per-image entropy is a mean of equal slices already).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glsd.loss.dino import teacher_probs

MIN_EFFECTIVE_PROTOTYPES = 2.0  # below: the teacher sends (nearly) every image to one prototype
MIN_KL_UNIFORM_FRACTION = 0.01  # of log K: teacher outputs this close to uniform carry nothing
# per-dimension std x sqrt(D): about 1 for features spread over the sphere, 0 when every image
# has the same feature
MIN_FEATURE_SPREAD = 0.02


@torch.no_grad()
def collapse_indicators(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float,
                        features: torch.Tensor) -> dict[str, torch.Tensor]:
    """teacher_logits ``(..., K)`` (the teacher's global outputs), center ``(1, K)``,
    features ``(N, D)`` (backbone global features) -> scalar tensors:

    - ``teacher_entropy``: mean per-image entropy of the centred, sharpened teacher output;
    - ``teacher_kl_uniform``: log K minus it (0: uniform outputs);
    - ``effective_prototypes``: exp(entropy of the batch-mean teacher distribution), in [1, K];
    - ``feature_std``: mean over dimensions of the batch std of the L2-normalised features;
    - ``feature_spread``: feature_std x sqrt(D) (scale-free: ~1 healthy, 0 collapsed).
    """
    probs = teacher_probs(teacher_logits.flatten(0, -2), center, teacher_temp)  # (N, K)
    k = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    z = F.normalize(features.float(), dim=-1)
    if dist.is_available() and dist.is_initialized():
        mean, std = _global_batch_moments(probs, z)
    else:
        mean, std = probs.mean(0), z.std(0, unbiased=False).mean()
    effective = torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())
    return {"teacher_entropy": entropy, "teacher_kl_uniform": math.log(k) - entropy,
            "effective_prototypes": effective, "feature_std": std,
            "feature_spread": std * math.sqrt(z.shape[-1])}


def _global_batch_moments(probs: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch-mean teacher distribution ``(K,)``, mean per-dimension feature std) over every
    rank's rows: one all-reduce of the sums (collective)."""
    k, d = probs.shape[-1], z.shape[-1]
    sums = torch.cat([probs.sum(0), z.sum(0), (z * z).sum(0), z.new_full((1,), z.shape[0])])
    dist.all_reduce(sums)
    n = sums[-1]
    zmean = sums[k:k + d] / n
    var = (sums[k + d:k + 2 * d] / n - zmean * zmean).clamp_min(0.0)
    return sums[:k] / n, var.sqrt().mean()


def collapse_reason(record: dict, num_prototypes: int) -> Optional[str]:
    """Why one logged record looks collapsed, or None."""
    reasons = []
    if "effective_prototypes" in record and record["effective_prototypes"] < MIN_EFFECTIVE_PROTOTYPES:
        reasons.append(f"the teacher uses {record['effective_prototypes']:.3g} effective prototypes "
                       f"of {num_prototypes}")
    if "teacher_kl_uniform" in record and \
            record["teacher_kl_uniform"] < MIN_KL_UNIFORM_FRACTION * math.log(num_prototypes):
        reasons.append(f"teacher outputs are uniform (entropy {record['teacher_entropy']:.3g} of "
                       f"log K = {math.log(num_prototypes):.3g})")
    if "feature_spread" in record and record["feature_spread"] < MIN_FEATURE_SPREAD:
        reasons.append(f"backbone features are identical across images (std {record['feature_std']:.3g})")
    return "; ".join(reasons) or None


class CollapseMonitor:
    """Warns once when ``patience`` consecutive logged records look collapsed; re-arms when
    the indicators recover."""

    FIX = ("Usual fixes: a lower loss.teacher_temp or a longer loss.warmup_teacher_temp_epochs, "
           "loss.center_momentum closer to 1, a lower train.lr, model.norm_last_layer=true")

    def __init__(self, num_prototypes: int, patience: int = 3, start_step: int = 0):
        self.num_prototypes, self.patience = num_prototypes, patience
        # Before the lr warm-up and the prototype freeze end, a teacher that sends every image
        # to a few prototypes is the initial state, not a collapse.
        self.start_step = start_step
        self.streak, self.warned = 0, False

    def update(self, record: dict) -> Optional[str]:
        """The warning to print, or None."""
        if self.patience <= 0 or record.get("step", 0) <= self.start_step:
            return None
        reason = collapse_reason(record, self.num_prototypes)
        if reason is None:
            self.streak, self.warned = 0, False
            return None
        self.streak += 1
        if self.streak < self.patience or self.warned:
            return None
        self.warned = True
        return (f"the run looks collapsed at step {record.get('step')} ({self.streak} logging steps "
                f"in a row): {reason}. {self.FIX}.")
