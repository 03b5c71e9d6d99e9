"""Batch statistics over all ranks, on any device.

``torch.nn.SyncBatchNorm`` refuses CPU modules ("SyncBatchNorm layers only work with GPU
modules"), so under gloo a BatchNorm backbone would normalise each rank's slice of the
global batch by its own statistics, and 2 processes x B would not train like 1 x 2B. On a
CPU :class:`GroupBatchNorm` takes the place of every BatchNorm layer: per channel, the sum,
the sum of squares and the count of the local batch go through one differentiable
all-reduce (:class:`_AllReduceSum`: the sum in forward, the sum of the ranks' gradients in
backward, as ``torch.distributed.nn.functional.all_reduce``, which is deprecated), in float64 so that ``E[x^2] - E[x]^2`` keeps the precision of torch's two-pass
variance. On CUDA torch's own SyncBatchNorm does the same with NCCL's fused kernels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' output
    gradients (each rank's loss depends on every rank's statistics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole process group's batch.

    Input ``(N, C, *)``; outside a process group, or in eval mode, a plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        x64 = x.double()
        local = torch.cat([x64.sum(dims), (x64 * x64).sum(dims),
                           x64.new_full((1,), x.numel() / x.shape[1])])
        total = _AllReduceSum.apply(local)  # (2C + 1,) summed over ranks, differentiable
        c = x.shape[1]
        count = total[2 * c]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp(min=0.0)  # biased, as BatchNorm
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(count.detach()))
        shape = [1, c] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(var + self.eps)
        y = (x64 - mean.view(shape)) * inv.view(shape)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_group_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` -> :class:`GroupBatchNorm` (weights and buffers kept)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GroupBatchNorm):
        new = GroupBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        new = new.to(next(iter(module.buffers()), torch.empty(0)).device)
        if module.affine:  # a norm no output uses was frozen (freeze_unused_parameters): still
            for name in ("weight", "bias"):
                getattr(new, name).requires_grad_(getattr(module, name).requires_grad)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_group_batchnorm(child))
    return module


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers with statistics over all ranks: torch's SyncBatchNorm on CUDA,
    :class:`GroupBatchNorm` elsewhere (gloo on a CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_group_batchnorm(module)
