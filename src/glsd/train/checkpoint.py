"""Checkpoints: atomic writes (:mod:`glsd.utils.io`), safe (weights-only) reads, and the exported backbone.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``, which
refuses any pickled object other than tensors and plain containers, so a crafted file cannot
run code. Writes go to a temporary file that is flushed, fsynced and renamed, so a kill at any
moment leaves either the previous or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save

from glsd.utils.io import atomic_write

FORMAT = "glsd-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without executing anything it may contain."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and "
                              f"plain containers, which could run code when unpickled ({e})") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a glsd checkpoint (format {FORMAT})")
    return ckpt


def export_backbone(path: Path, model: torch.nn.Module, config: dict) -> None:
    """Save a bare (timm) backbone's weights as safetensors, with the run config as metadata."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "glsd-backbone-v1", "backbone": config["model"]["backbone"],
            "config": json.dumps(config)}
    data = save(tensors, metadata=meta)
    atomic_write(Path(path), lambda f: f.write(data))


def read_backbone_config(path: Path) -> Optional[dict]:
    """The run config stored in an exported backbone's safetensors metadata (None if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["config"]) if "config" in meta else None


def read_backbone(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) of an exported backbone; the config is from its metadata."""
    config = read_backbone_config(path)
    if config is None:
        raise CheckpointError(f"{path} has no glsd config in its metadata; export it with glsd")
    return load_file(str(path)), config
