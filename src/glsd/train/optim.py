"""The optimisation rule of a training step: parameter groups (DINO's weight-decay rule),
gradient clipping (per parameter tensor as DINO, or one global norm), AdamW and the grad
scaler, synchronised BatchNorm under a process group, the objective (the losses and their
centres, moved to the device with the networks), and the EMA teacher update."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from glsd.config import Config
from glsd.models.heads import GLSDNet
from glsd.train.objective import GlobalLocalObjective
from glsd.train.sync_batchnorm import sync_batchnorm
from glsd.utils.device import resolve_precision


def param_groups(model: nn.Module, decay_magnitude: bool = True) -> list[dict]:
    """Weight decay on every parameter of ndim >= 2 (DINO's rule); biases and norms are exempt.

    The weight-norm magnitude of a last layer (``.original0``, shape ``(out, 1)``) is decayed
    as DINO does unless ``decay_magnitude`` is false (``train.decay_weightnorm_magnitude``).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or (not decay_magnitude and name.endswith(".original0"))
        (no_decay if exempt else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(params, max_norm: float, mode: str = "per_param") -> torch.Tensor:
    """Clip gradients in place: ``per_param`` scales each tensor's gradient to norm at most
    ``max_norm`` on its own (DINO's ``utils.clip_gradients``, coefficient
    ``max_norm / (norm + 1e-6)`` when below 1); ``global`` is ``clip_grad_norm_`` over all.

    Returns the total norm of all gradients before clipping (a 0-dim tensor; the finite check).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coefs = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)  # one sync-free pass: no .item() per tensor
    return total


@dataclass
class Optimisation:
    """What a training step needs besides the networks (see :func:`build_optimisation`)."""
    student: GLSDNet
    teacher: GLSDNet
    objective: GlobalLocalObjective
    optimizer: torch.optim.Optimizer
    amp_dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler


def build_optimisation(cfg: Config, student: GLSDNet, teacher: GLSDNet, device: torch.device,
                       distributed: bool = False) -> Optimisation:
    """Memory layout, synchronised BatchNorm (under a process group), the objective (both
    centres), AdamW and the grad scaler, as every training step uses them (also ``glsd bench``)."""
    if cfg.model.channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    if distributed and has_batchnorm(student):  # statistics of the global batch
        student = sync_batchnorm(student, device)
        teacher = sync_batchnorm(teacher, device)
    objective = GlobalLocalObjective.from_config(cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.train.decay_weightnorm_magnitude), lr=0.0,
                                  foreach=True)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Optimisation(student, teacher, objective, optimizer, amp_dtype, scaler)


def drop_prototype_grads(student: GLSDNet) -> None:
    """DINO's frozen last layer: the heads' prototypes keep their initial values while the
    rest settles (their gradients are dropped, so AdamW leaves them and their moments alone)."""
    for head in (student.global_head, student.local_head):
        if head is not None:
            for p in head.last_layer.parameters():
                p.grad = None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in one fused call."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def apply_schedule(optimizer: torch.optim.Optimizer, sched, step: int) -> None:
    """This step's learning rate on every group and weight decay on the decayed group (the
    first, see :func:`param_groups`)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(sched.lr[step])
        if i == 0:
            group["weight_decay"] = float(sched.wd[step])
