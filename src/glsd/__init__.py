"""glsd: global-local self-distillation for visual representation learning.

The Python API, four functions; ``import glsd`` is light (torch loads on the first call):

* :func:`load_config` -- a preset or YAML file plus overrides, validated;
* :func:`pretrain` -- train, returns a :class:`RunResult` (run folder, steps, exports);
* :func:`embed` -- features of every image of a folder, zip or dataset;
* :func:`load_backbone` -- the trained backbone as a plain ``nn.Module``.

Overrides are keyword arguments named after the dotted config keys with ``__`` for each dot
(``train__epochs=1`` is ``train.epochs=1`` on the command line); values are Python values
(``model__backbone_kwargs={"depth": 2}`` replaces the mapping). A dict of dotted keys works
too: ``glsd.pretrain("cpu-default", **{"train.epochs": 1})``.

The whole workflow on synthetic images, a few steps:

>>> import glsd, tempfile
>>> run = glsd.pretrain("cpu-default", output_dir=tempfile.mkdtemp() + "/run",
...                     data__synthetic_num_images=16, data__num_workers=0,
...                     train__batch_size=8, train__max_steps=2, train__progress=False)
>>> run.steps, run.backbone.name, run.export_dir.parts[-2:]
(2, 'backbone.safetensors', ('export', 'timm'))
>>> emb = glsd.embed(run.run_dir, "synthetic", data__synthetic_num_images=10)
>>> tuple(emb.features.shape), emb.labels.tolist()[:4]
((10, 128), [0, 1, 2, 3])
>>> model = glsd.load_backbone(run.export_dir)  # or the run folder, a .pt, backbone.safetensors
>>> import torch
>>> tuple(model(torch.zeros(1, 3, 32, 32)).shape)
(1, 128)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # names for the annotations only: importing them would load torch
    from torch import nn

    from glsd.config import Config
    from glsd.embedding import EmbedResult

from glsd.errors import CheckpointError, ConfigError, DataError, GlsdError, TrainingInterrupted  # torch-free

__version__ = "0.1.0"
__all__ = ["RunResult", "embed", "load_backbone", "load_config", "pretrain", "__version__",
           "GlsdError", "ConfigError", "CheckpointError", "DataError", "TrainingInterrupted"]


def _refuse_in_spawned_import(call: str) -> None:
    """A loader worker started by spawn (macOS, Windows) imports the caller's script again: a
    top-level ``glsd.pretrain(...)`` there would start a second run in the worker (it would
    find the run folder locked, and the worker would die with a misleading message)."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise GlsdError(f"glsd.{call}() was called while a worker process was importing your script "
                        "(on macOS and Windows, loader workers start by importing it again). Put "
                        "the calls under `if __name__ == \"__main__\":`, or set data.num_workers=0")


def _override_strings(overrides: dict[str, Any]) -> list[str]:
    """``{"train__epochs": 1, "data.root": Path("x")}`` -> ``["train.epochs=1", 'data.root="x"']``.

    Values go through JSON, which YAML (the override parser) reads back exactly: strings stay
    strings (``"1e-3"`` too), lists and dicts keep their types.
    """
    out = []
    for key, value in overrides.items():
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, tuple):
            value = list(value)
        out.append(f"{key.replace('__', '.')}={_yaml_text(value)}")
    return out


def _yaml_text(value: Any) -> str:
    """A Python value as YAML that reads back as the same value: JSON, except that a float
    keeps a dot before its exponent (YAML 1.1 reads ``1e-05`` as a string, ``1.0e-05`` as a
    float) anywhere in a list or mapping. A numpy scalar (from ``np.logspace``) is its Python
    value, an array or tensor its list, a path its string, a tuple a list."""
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # numpy / torch, scalar or array
        value = value.tolist()
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return json.dumps(value)


def load_config(preset_or_yaml: Optional[str] = None, **overrides: Any) -> "Config":
    """The validated :class:`glsd.config.Config` of a preset name or YAML path plus overrides.

    >>> import glsd
    >>> cfg = glsd.load_config("cpu-default", train__epochs=1, crops__num_local=2)
    >>> cfg.train.epochs, cfg.crops.num_local, cfg.model.backbone
    (1, 2, 'glsd_convnet')
    """
    from glsd.config import load_config as _load

    return _load(preset_or_yaml, _override_strings(overrides))


@dataclass(frozen=True)
class RunResult:
    """What :func:`pretrain` produced."""
    run_dir: Path  # the run folder (config.yaml, metrics.jsonl, checkpoints/, ...)
    steps: Optional[int]  # optimisation steps done (the last logged step)
    backbone: Path  # RUN_DIR/backbone.safetensors: the teacher backbone
    export_dir: Path  # RUN_DIR/export/timm: config.json + model.safetensors for plain timm
    config: "Config"


def pretrain(preset_or_yaml: Union[str, "Config"], **overrides: Any) -> RunResult:
    """Pretrain (or resume, when ``output_dir`` holds a checkpoint of the same config).

    Args:
        preset_or_yaml: a preset name (``glsd presets``), a YAML path, or a ``Config``.
        overrides: config keys with ``__`` for dots, e.g. ``train__epochs=1``.
    Returns:
        A :class:`RunResult`. Raises ``TrainingInterrupted`` when a signal stopped the run
        (checkpoint written; calling again resumes).

    >>> import glsd, tempfile
    >>> run = glsd.pretrain("cpu-default", output_dir=tempfile.mkdtemp() + "/run",
    ...                     data__synthetic_num_images=8, data__num_workers=0,
    ...                     train__batch_size=8, train__max_steps=1, train__progress=False)
    >>> run.steps, sorted(p.name for p in run.export_dir.iterdir())
    (1, ['README.md', 'config.json', 'model.safetensors'])
    """
    from glsd.config import Config, apply_overrides
    from glsd.export import EXPORT_DIR
    from glsd.train.pretrain import pretrain as _pretrain
    from glsd.run_layout import BACKBONE_FILE
    from glsd.train.run_folder import last_logged_step

    _refuse_in_spawned_import("pretrain")
    if isinstance(preset_or_yaml, Config):
        cfg = apply_overrides(preset_or_yaml, _override_strings(overrides))
    else:
        cfg = load_config(preset_or_yaml, **overrides)
    run_dir = Path(_pretrain(cfg))
    return RunResult(run_dir, last_logged_step(run_dir), run_dir / BACKBONE_FILE,
                     run_dir / EXPORT_DIR, cfg)


def embed(source: Union[str, Path], data: Union[str, Path], out: Union[str, Path, None] = None, *,
          local: bool = False, device: str = "auto", batch_size: Optional[int] = None,
          student: bool = False, progress: bool = False, **overrides: Any) -> "EmbedResult":
    """Features of every readable image of ``data`` (see :mod:`glsd.embedding` for the files).

    Args:
        source: a run folder, a checkpoint ``.pt`` or a ``backbone.safetensors``.
        data: a folder, a zip, or ``cifar10`` / ``cifar100`` / ``stl10`` / ``fashion_mnist`` /
            ``synthetic`` / ``sample``.
        out: ``.safetensors`` or ``.npy`` to write (with a ``.csv`` index); None: in memory.
        local: also the pooled local features (``result.local``).
        overrides: e.g. ``data__split="test"``, ``eval__image_size=64``.
    Returns:
        An :class:`glsd.embedding.EmbedResult`: ``features (N, D)``, ``labels (N,)``, ``keys``,
        ``skipped`` (unreadable images), ``files``.

    >>> import glsd, tempfile
    >>> run = glsd.pretrain("cpu-default", output_dir=tempfile.mkdtemp() + "/run",
    ...                     data__synthetic_num_images=8, data__num_workers=0,
    ...                     train__batch_size=8, train__max_steps=1, train__progress=False)
    >>> res = glsd.embed(run.run_dir, "synthetic", run.run_dir / "emb.safetensors", local=True,
    ...                  data__synthetic_num_images=6)
    >>> tuple(res.features.shape), tuple(res.local.shape), [f.name for f in res.files]
    ((6, 128), (6, 128), ['emb.safetensors', 'emb.csv'])
    """
    from glsd.embedding import embed as _embed

    _refuse_in_spawned_import("embed")
    # A Path is a folder or file, even one named like a dataset (./sample, ./cifar10).
    spec = str(data) if not isinstance(data, Path) or data.is_absolute() else f"./{data}"
    return _embed(source, spec, out, local=local, device=device, batch_size=batch_size,
                  overrides=_override_strings(overrides), which="student" if student else None,
                  progress=progress)


def load_backbone(path: Union[str, Path], student: bool = False) -> "nn.Module":
    """The trained backbone as a plain module (a timm model for timm names), eval mode, CPU.

    ``path``: a run folder, a checkpoint ``.pt``, a ``backbone.safetensors`` or an export
    folder (``RUN_DIR/export/timm``), in eval mode with trainable parameters (to fine-tune;
    ``requires_grad_(False)`` freezes it). ``model(x)`` gives timm's own pooled ``(B, D)``
    feature: glsd's global feature for a ViT trained and evaluated on its CLS token; for other
    models and settings the export folder's README.md gives the line (it may differ: a head
    norm glsd never trains, the CLS token where glsd evaluated the patch mean).
    ``model.forward_features(x)`` gives the tokens or feature map.

    >>> import glsd, tempfile, torch
    >>> run = glsd.pretrain("cpu-default", output_dir=tempfile.mkdtemp() + "/run",
    ...                     data__synthetic_num_images=8, data__num_workers=0,
    ...                     train__batch_size=8, train__max_steps=1, train__progress=False)
    >>> model = glsd.load_backbone(run.run_dir)
    >>> type(model).__name__, model.training, tuple(model(torch.zeros(2, 3, 32, 32)).shape)
    ('ConvNet', False, (2, 128))
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        from glsd.export import load_export_folder

        if student:
            from glsd.errors import ConfigError

            raise ConfigError(f"{path} is an export folder: it holds only the teacher; give the "
                              "run folder (its checkpoints/last.pt) for the student")
        return load_export_folder(path).eval().requires_grad_(True)
    from glsd.eval.features import load_backbone as _load

    backbone, _, _ = _load(path, "student" if student else "teacher")
    return backbone.model.eval().requires_grad_(True)  # the same from every input: trainable
