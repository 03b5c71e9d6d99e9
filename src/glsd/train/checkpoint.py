"""Checkpoints: atomic writes, safe (weights-only) reads, and the exported backbone.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``, which
refuses any pickled object other than tensors and plain containers, so a crafted file cannot
run code. Writes go to a temporary file that is flushed, fsynced and renamed, so a kill at any
moment leaves either the previous or the new checkpoint, never a torn one.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "glsd-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then atomically replace ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


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
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def read_backbone(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) of an exported backbone; the config is from its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise CheckpointError(f"{path} has no glsd config in its metadata; export it with glsd")
    return load_file(str(path)), json.loads(meta["config"])
