"""The autocast dtype of train.precision (glsd.utils.device.resolve_precision); the hardware
probes are mocked so that every branch runs on any machine."""
import pytest
import torch

import glsd.utils.device as device_mod
from glsd.utils.device import resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("dev", [CPU, CUDA])
def test_explicit_precisions_ignore_the_device(dev):
    assert resolve_precision("fp32", dev) is None
    assert resolve_precision("bf16", dev) is torch.bfloat16
    assert resolve_precision("fp16", dev) is torch.float16


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", CUDA) is expected


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_is_bf16_where_supported_else_fp32(monkeypatch, bf16, expected):
    monkeypatch.setattr(device_mod, "_cpu_has_bf16", lambda: bf16)
    # A CUDA probe must not decide a CPU run's precision (fp16 on CPU is no fallback).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: not bf16)
    assert resolve_precision("auto", CPU) is expected


@pytest.mark.parametrize("name", ["mps", "xpu", "banana"])
def test_devices_other_than_cpu_and_cuda_are_refused_by_name(name):
    """The config refuses them by its choices; the Python API's device= comes through here."""
    from glsd.config import ConfigError
    from glsd.utils.device import device_type

    with pytest.raises(ConfigError, match="cpu or cuda"):
        device_type(name)
    assert device_type("cpu") == "cpu"
