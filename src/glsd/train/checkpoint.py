"""Checkpoints: atomic writes (:mod:`glsd.utils.io`), safe (weights-only) reads, and the exported backbone.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``, which
refuses any pickled object other than tensors and plain containers, so a crafted file cannot
run code; whatever else is wrong with a file (truncated, fuzzed, another format, missing
keys) is a :class:`CheckpointError` naming it. Writes go to a temporary file that is flushed,
fsynced and renamed, so a kill at any moment leaves either the previous or the new
checkpoint, never a torn one; a full disk is a :class:`DiskFull` error that says so.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save

from glsd.errors import CheckpointError, DiskFull, GlsdError  # noqa: F401 - importable from here
from glsd.run_layout import CHECKPOINT_DIR
from glsd.utils.io import TMP_MARK, atomic_write

FORMAT = "glsd-checkpoint-v1"


def sweep_temp_files(root: Path) -> list[Path]:
    """Remove temp files torn by a kill (``.NAME.tmp-PID``) under a run folder; call it with
    the folder's lock held, when no writer of this run is live."""
    removed = []
    root = Path(root)  # not eval/: an evaluation may be writing there, under its own lock
    for p in [*root.glob(f".*{TMP_MARK}*"), *(root / CHECKPOINT_DIR).glob(f".*{TMP_MARK}*")]:
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def safe_message(e: BaseException) -> str:
    """An exception's message without torch's advice to load unsafely (``weights_only=False``)
    or to allow-list globals: for an untrusted file that is the attack."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:  # the refused object; the rest of torch's text explains how to load it anyway
        return found.group(0)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if not any(w in line.lower() for w in (
        "weights_only", "likely succeed", "safe_globals", "trust", "re-running", "can still be loaded",
        "pytorch.org", "check the documentation", "allowlist"))]
    return " ".join(keep)[:300] or type(e).__name__


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle of protocol >= 2)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


# Evaluation and a resume onto a GPU map a checkpoint rather than read it all (ranks on one
# host share the pages). Not on Windows, where a mapped last.pt could not be replaced by the
# next save of a run; not for a resume on the CPU, whose optimizer state would keep the old
# file mapped (and its disk space held) for the whole run.
MAP_CHECKPOINTS = os.name != "nt"


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint without executing anything it may contain; its structure is checked
    (a dict of the glsd format whose ``student`` / ``teacher`` map names to tensors).
    ``mmap``: tensors are read from the file when used (an evaluation reads the teacher's
    backbone, not the whole training state; processes on one host share the pages)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # mmap reads only torch's zip format; any other file gets the unmapped load's diagnosis
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if not _looks_like_torch_file(path):  # garbage, an HTML page: not an attack, a bad file
            raise CheckpointError(f"checkpoint {path} is not a torch checkpoint (corrupt, or another "
                                  "kind of file saved under its name)") from None
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and "
                              f"plain containers, which could run code when unpickled "
                              f"({safe_message(e)})") from None
    except MemoryError:
        raise CheckpointError(f"checkpoint {path} is corrupt (it asks for more memory than "
                              "exists)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure means one thing: a bad file
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated "
                              f"({type(e).__name__}: {safe_message(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a glsd checkpoint (format {FORMAT})")
    for key in ("student", "teacher"):
        state = ckpt.get(key)
        if state is not None and not (isinstance(state, dict) and all(
                isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
            raise CheckpointError(f"checkpoint {path} is corrupt: '{key}' is not a mapping of "
                                  "names to tensors")
    if not isinstance(ckpt.get("step", 0), int) or not isinstance(ckpt.get("config", {}), dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: bad 'step' or 'config' entry")
    return ckpt


def checkpoint_config(path: Path) -> Optional[dict]:
    """The config saved in a checkpoint, reading little of it (the file is memory-mapped, its
    tensors are not read); None when it cannot be read (loading it later says why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure: the full load names it
        return None
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    return config if isinstance(config, dict) else None


def export_backbone(path: Path, model: torch.nn.Module, config: dict) -> None:
    """Save a bare (timm) backbone's weights as safetensors, with the run config as metadata."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "glsd-backbone-v1", "backbone": config["model"]["backbone"],
            "config": json.dumps(config)}
    data = save(tensors, metadata=meta)
    atomic_write(Path(path), lambda f: f.write(data))


def read_backbone_config(path: Path) -> Optional[dict]:
    """The run config stored in an exported backbone's safetensors metadata (None if absent);
    the header is checked first (see glsd.weights)."""
    from glsd.weights import metadata_config, read_safetensors_metadata

    meta = read_safetensors_metadata(path)
    return metadata_config(meta, path) if "config" in meta else None


def read_backbone(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) of an exported backbone; the config is from its metadata.
    The file is checked before use (see glsd.weights.read_safetensors)."""
    from glsd.weights import metadata_config, read_safetensors

    state, meta = read_safetensors(path)
    return state, metadata_config(meta, path)


def read_json_record(path: Path):
    """The JSON object in ``path``, or None when it is missing, torn or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
