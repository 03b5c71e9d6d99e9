"""Per-step schedules (lr, weight decay, teacher momentum, teacher temperature)."""
from __future__ import annotations

import numpy as np


def cosine(start: float, end: float, total_steps: int, warmup_steps: int = 0,
           warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start``, then cosine from ``start`` to ``end``.

    Returns ``total_steps`` values, one per optimisation step.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    decay = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, decay])


def teacher_temperature(warmup_temp: float, temp: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear warm-up of the teacher temperature, then constant."""
    warmup_steps = min(warmup_steps, total_steps)
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_steps),
                           np.full(total_steps - warmup_steps, temp)])


def warmup_steps(cfg, steps_per_epoch: int) -> int:
    """The learning-rate warm-up in steps (``train.warmup_steps``, else ``warmup_epochs``)."""
    t = cfg.train
    return t.warmup_steps if t.warmup_steps is not None else int(t.warmup_epochs * steps_per_epoch)


def freeze_last_layer_steps(cfg, steps_per_epoch: int) -> int:
    """Steps the prototypes (the heads' last layers) stay frozen: the step count when given."""
    t = cfg.train
    return (t.freeze_last_layer_steps if t.freeze_last_layer_steps is not None
            else int(t.freeze_last_layer_epochs * steps_per_epoch))


def teacher_temp_warmup_steps(cfg, steps_per_epoch: int) -> int:
    return int(cfg.loss.warmup_teacher_temp_epochs * steps_per_epoch)


def peak_lr(cfg, global_batch: int) -> float:
    """The learning rate after the warm-up: ``train.lr`` scaled by the global batch / 256."""
    return cfg.train.lr * global_batch / 256.0


class Schedules:
    """All per-step values of a run, from its config and the number of steps per epoch."""

    def __init__(self, cfg, steps_per_epoch: int, global_batch: int):
        t, lo = cfg.train, cfg.loss
        total = cfg.train.epochs * steps_per_epoch
        warmup = warmup_steps(cfg, steps_per_epoch)
        self.lr = cosine(peak_lr(cfg, global_batch), t.min_lr, total, warmup)
        self.wd = cosine(t.weight_decay, t.weight_decay_end, total)
        self.momentum = cosine(t.momentum_teacher, t.momentum_teacher_end, total)
        self.teacher_temp = teacher_temperature(lo.warmup_teacher_temp, lo.teacher_temp,
                                                teacher_temp_warmup_steps(cfg, steps_per_epoch), total)
        self.freeze_last_layer_steps = freeze_last_layer_steps(cfg, steps_per_epoch)
        self.total_steps = total
        self.warmup_steps = min(warmup, total)
