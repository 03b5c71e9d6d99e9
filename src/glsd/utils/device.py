"""Which device and which autocast precision a run uses: one rule for training, evaluation,
pictures and the bench."""
from __future__ import annotations

from typing import Optional, Union

import torch

from glsd.config import ConfigError


def device_type(name: Union[str, torch.device]) -> str:
    """"cuda" or "cpu" for a ``device`` setting, touching no device: under torchrun it picks
    the process group's backend before each rank is given its GPU, and asking for the current
    device then would start every rank on GPU 0."""
    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):  # the config refuses these too; the Python API's device= here
        raise ConfigError(f"device={name!r}: glsd runs on cpu or cuda (or auto). Apple GPUs (mps) "
                          "are not supported: a Mac trains on its CPU, device=cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return kind


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without an index -> the current CUDA
    device (the rank's GPU under torchrun, once the process group is set up)."""
    kind = device_type(name)
    dev = torch.device(kind if str(name) == "auto" else str(name))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.precision`` on ``device``, or None for fp32. "auto":
    bf16 where the hardware has it (fp16 on older GPUs), else fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
