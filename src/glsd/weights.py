"""Load-side checks of weight files: an exported ``backbone.safetensors`` is untrusted input.

``read_safetensors`` checks the header before any tensor is read (size, JSON, dtypes, shapes
and offsets), refuses dtypes no trained backbone has (bool, integers other than BatchNorm's
counter, fp8), downcasts float64 to float32 (refusing values that overflow) and refuses
non-finite weights. ``check_model_size`` builds the model a config describes on the meta
device (no memory) and refuses an absurd parameter count before the real model is built.
"""
from __future__ import annotations

import json
import math
import struct
import threading
from pathlib import Path
from typing import Mapping, Optional

import torch

from glsd.errors import CheckpointError, ConfigError

MAX_HEADER_BYTES = 100 * 2**20
MAX_PARAMETERS = 4_000_000_000  # 16 GB of float32; the largest public ViTs are ~1-2 B
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
INT_DTYPES = {"I64": 8}  # BatchNorm's num_batches_tracked
INT_KEY_SUFFIXES = ("num_batches_tracked",)
_probe = threading.local()


def _fail(path, what: str) -> CheckpointError:
    # One message for both readers: a glsd weights file, or model.init_from's timm hub file.
    return CheckpointError(f"{path} is not a valid backbone weights file: {what}. Give the "
                           "RUN_DIR/backbone.safetensors glsd writes at the end of pretraining, a "
                           "`glsd export RUN_DIR` folder (made from the run's checkpoint), or for "
                           "model.init_from the model.safetensors of a timm model of this architecture")


def _header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _fail(path, f"its header claims {n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "its header is not a JSON object")
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, data_bytes)
    return header


def _check_entry(path, name: str, entry, data_bytes: int) -> None:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r} has no dtype/shape entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype in INT_DTYPES and not name.endswith(INT_KEY_SUFFIXES) or (
            dtype not in FLOAT_DTYPES and dtype not in INT_DTYPES):
        raise _fail(path, f"tensor {name!r} has dtype {dtype}; backbone weights are float32, "
                          "float16, bfloat16 or float64 (bool, integer and fp8 weights are refused)")
    if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**40 for d in shape)):
        raise _fail(path, f"tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise _fail(path, f"tensor {name!r} has bad offsets {offsets!r}")
    itemsize = FLOAT_DTYPES.get(dtype) or INT_DTYPES[dtype]
    if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise _fail(path, f"tensor {name!r}: shape {shape} does not match its {offsets[1] - offsets[0]} bytes")


def read_safetensors_metadata(path) -> dict[str, str]:
    """The metadata of a safetensors file whose header passed the checks (no tensor read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    meta = _header(path).get("__metadata__") or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "its metadata is not a mapping of strings")
    return meta


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a checked safetensors file; float64 comes back as float32.
    Raises CheckpointError naming the file and the problem."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    header = _header(path)
    meta = header.get("__metadata__") or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "its metadata is not a mapping of strings")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - the header passed; anything left is a corrupt file
        raise _fail(path, f"{type(e).__name__}: {str(e)[:200]}") from None
    for k, v in state.items():
        if v.dtype == torch.float64:
            state[k] = v.float()
    bad = nonfinite(state)
    if bad:
        raise _fail(path, f"{len(bad)} of {len(state)} tensors hold NaN or inf (e.g. {bad[0]}), "
                          "or float64 values beyond float32's range")
    return state, meta


def nonfinite_tensors(states: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """``"section.key"`` of every floating tensor holding a NaN or inf, e.g. over
    ``{"student": student.state_dict(), "teacher": ...}``. One fused norm per section; the tensors
    it flags are then read one by one, because a norm also overflows from finite values (an
    fp16 tensor's past 65,504), which names nothing."""
    bad = []
    for section, state in states.items():
        names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
        if not names:
            continue
        norms = torch._foreach_norm([state[k].detach() for k in names])
        finite = torch.isfinite(torch.stack([n.float() for n in norms]))
        if bool(finite.all()):
            continue
        bad += [f"{section}.{k}" for k, ok in zip(names, finite.tolist())
                if not ok and not bool(torch.isfinite(state[k].detach()).all())]
    return bad


def nonfinite(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k.split(".", 1)[1] for k in nonfinite_tensors({"w": state})]


def metadata_config(meta: Mapping[str, str], path) -> dict:
    """The run config a glsd export carries in its metadata."""
    if "config" not in meta:
        raise CheckpointError(f"{path} has no glsd config in its metadata; export it with glsd")
    try:
        raw = json.loads(meta["config"])
    except ValueError as e:
        raise _fail(path, f"its config metadata is not JSON ({e})") from None
    except RecursionError:
        raise _fail(path, "its config metadata is nested beyond any config") from None
    if not isinstance(raw, dict):
        raise _fail(path, "its config metadata is not a mapping")
    return raw


def check_weights(state: Mapping[str, torch.Tensor], model: torch.nn.Module, source) -> None:
    """Refuse weights whose dtype the model's tensor cannot take without changing meaning
    (bool or integer into a float weight, a float into an integer buffer), and NaN or inf
    weights (a poisoned run must not evaluate to a plausible number)."""
    bad = nonfinite(state)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} of {len(state)} tensors hold NaN or inf "
                              f"(e.g. {bad[0]}); the run diverged or the file is corrupt")
    own = model.state_dict()
    for k, v in state.items():
        ref = own.get(k)
        if ref is None or not torch.is_tensor(v):
            continue
        if ref.is_floating_point() != v.is_floating_point() or v.dtype == torch.bool \
                or v.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
            raise CheckpointError(f"{source}: tensor {k!r} is {v.dtype}, the model's is {ref.dtype}; "
                                  "the file is corrupt or not of this model")


def load_checked_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source,
                         does_not_fit: str) -> torch.nn.Module:
    """``state`` into ``model`` (strict) after :func:`check_weights`; keys or shapes that do
    not fit are a ConfigError: "weights in SOURCE do not fit DOES_NOT_FIT (torch's words)"."""
    check_weights(state, model, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ConfigError(f"weights in {source} do not fit {does_not_fit} "
                          f"({misfit(model.state_dict(), state)})") from None
    return model


def load_initial_weights(model: torch.nn.Module, path, what: str) -> list[str]:
    """The backbone weights of a safetensors file into ``model`` (model.init_from): every
    tensor of the model must be there with its shape; tensors the model has no place for (a
    classifier head of a hub checkpoint) are left out and returned by name."""
    path = Path(path).expanduser()
    state, _ = read_safetensors(path)
    own = model.state_dict()
    unused = sorted(k for k in state if k not in own)
    load_checked_weights(model, {k: v for k, v in state.items() if k in own}, path,
                         f"{what} (model.init_from: a file of another architecture or size?)")
    return unused


def misfit(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str:
    """How two state dicts differ, in one short line (torch lists every key)."""
    def some(names):
        names = sorted(names)
        return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")

    missing, unexpected = set(expected) - set(got), set(got) - set(expected)
    shapes = [k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape)]
    parts = [f"{len(missing)} missing ({some(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
             f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(got[shapes[0]].shape)} for "
             f"{tuple(expected[shapes[0]].shape)})" if shapes else ""]
    return "tensors: " + "; ".join(p for p in parts if p) if any(parts) else "no tensor differs by name or shape"


def check_model_size(build, what: str, limit: int = MAX_PARAMETERS) -> Optional[int]:
    """Build ``build()`` on the meta device (no memory) and refuse more than ``limit``
    parameters. Re-entrant calls (the build itself) and models that cannot be built on the
    meta device pass unchecked; returns the count or None."""
    if getattr(_probe, "active", False):
        return None
    _probe.active = True
    try:
        with torch.device("meta"):
            model = build()
        n = sum(t.numel() for t in model.state_dict().values())
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - the real build reports its own error
        return None
    finally:
        _probe.active = False
    if n > limit:
        raise ConfigError(f"{what} describes a model of {n:,} parameters ({n * 4 / 1e9:,.0f} GB "
                          f"in float32), beyond the {limit:,} glsd builds; check model.backbone_kwargs")
    return n
