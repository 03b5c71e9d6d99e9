"""GroupBatchNorm: BatchNorm with the statistics of the whole process group, on the CPU.

Two ranks are tested in test_distributed.py (2 processes x B train like 1 x 2B with the conv
net); here one in-process gloo group of size 1 runs the all-reduce path itself, which must
then be a BatchNorm: outputs, input and weight gradients, running statistics.
"""
import copy
import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from glsd.train.sync_batchnorm import GroupBatchNorm, convert_group_batchnorm, sync_batchnorm

from helpers_tiny import free_port


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _pair(channels=5):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels), nn.ReLU())
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
    return ref, convert_group_batchnorm(copy.deepcopy(ref))


@pytest.mark.parametrize("in_group", [False, True])
def test_group_batchnorm_is_batchnorm_for_one_rank(request, in_group):
    if in_group:
        request.getfixturevalue("group_of_one")
    ref, ours = _pair()
    assert isinstance(ours[1], GroupBatchNorm) and torch.equal(ours[1].weight, ref[1].weight)
    x = torch.randn(6, 3, 9, 9) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # two steps: running statistics accumulate
        ya, yb = ref(xa), ours(xb)
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-5)
    (ya * torch.linspace(-1, 1, ya.numel()).view_as(ya)).sum().backward()
    (yb * torch.linspace(-1, 1, yb.numel()).view_as(yb)).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1].weight.grad, ref[1].weight.grad, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours[1], name), getattr(ref[1], name), rtol=0, atol=1e-6)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_cpu_modules_get_group_batchnorm():
    """torch's SyncBatchNorm refuses CPU modules in forward; CPU runs get ours instead."""
    net = sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.device("cpu"))
    assert isinstance(net[1], GroupBatchNorm)
    assert isinstance(sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), torch.device("cuda"))[0], nn.SyncBatchNorm)


def test_a_frozen_norm_stays_frozen_when_converted():
    """freeze_unused_parameters freezes a norm no output uses; DDP would wait for its gradient
    if the conversion made it trainable again."""
    bn = nn.BatchNorm2d(4)
    bn.weight.requires_grad_(False)
    converted = sync_batchnorm(nn.Sequential(bn), torch.device("cpu"))[0]
    assert not converted.weight.requires_grad and converted.bias.requires_grad
