"""``glsd presets``, ``glsd config`` and ``glsd backbones``: what a user can run, before running it.

``presets`` reads YAML only (no torch: it answers in well under a second); ``config`` and
``backbones`` probe feature grids on the meta device (shapes only, no weights).
"""
from __future__ import annotations

import fnmatch
from importlib import resources
from typing import Optional, Sequence

from glsd.config import ConfigError, dump_yaml, load_config, preset_names

DESCRIPTION_CHARS = 100


def preset_description(name: str) -> str:
    """The first sentence of the preset's leading comment block."""
    text = resources.files("glsd").joinpath(f"presets/{name}.yaml").read_text()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    words = " ".join(comment)
    end = words.find(". ")
    sentence = words if end < 0 else words[:end + 1]
    if len(sentence) > DESCRIPTION_CHARS:
        sentence = sentence[:DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."
    return sentence or "(no description)"


def preset_lines() -> list[str]:
    names = preset_names()
    width = max(map(len, names), default=0)
    return [f"{name:<{width}}  {preset_description(name)}" for name in names]


def config_dry_run(name_or_path: str, overrides: Sequence[str]) -> str:
    """The resolved, validated config as YAML, then (as YAML comments) the feature grid per crop
    size and, when the data can be opened, the images and schedule. Raises ConfigError."""
    from glsd.train.preflight import check_grids

    from glsd.utils.device import device_type

    cfg = load_config(name_or_path, overrides)
    grids, stride = check_grids(cfg)
    device_type(cfg.device)  # device=cuda on a machine without one: refused, as pretrain would
    lines = [dump_yaml(cfg).rstrip(), "# --- dry run: nothing trained ---",
             f"# backbone {cfg.model.backbone}" + (f", stride {stride}" if stride else "")]
    lines += [f"# feature grid {g[0]}x{g[1]} at {name}" for name, g in grids.items()]
    lines += [f"# {line}" for line in _data_lines(cfg)]
    return "\n".join(lines)


def _data_lines(cfg) -> list[str]:
    from glsd.data.sources import TORCHVISION_SOURCES, open_source
    from glsd.train.preflight import preflight

    if cfg.data.download and cfg.data.source in TORCHVISION_SOURCES:
        return ["data: not checked (data.download=true: a dry run downloads nothing)"]
    try:
        source = open_source(cfg.data)
    except ConfigError as e:
        if cfg.data.root:  # data named but not readable: what pretrain would refuse
            raise
        return [f"data: not checked ({str(e).splitlines()[0]})"]
    _, plan = preflight(cfg, source)  # its refusals are pretrain's: the dry run fails too
    stop = f", stopping at train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps else ""
    from glsd.train.console import folder_reading, labels_of

    lines = [f"data {source.name}: {len(source):,} images, {plan.num_images:,} used, {labels_of(source)}",
             *(f"  {line}" for line in folder_reading(cfg.data, source)),
             f"schedule {plan.steps_per_epoch:,} steps/epoch x {cfg.train.epochs} epochs = "
             f"{plan.total_steps:,} steps (one process){stop}"]
    return lines + [f"note: {n}" for n in plan.notes]


def backbone_names(pattern: Optional[str]) -> list[str]:
    """timm names matching a wildcard pattern (a bare word matches as *word*), and
    glsd_convnet when it matches."""
    import timm

    pattern = pattern or "*"
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = list(timm.list_models(pattern))
    return (["glsd_convnet"] if fnmatch.fnmatch("glsd_convnet", pattern) else []) + names


def backbone_line(name: str, sizes: Sequence[int], width: int = 0) -> str:
    """``resnet50  stride 32  224: 7x7  96: 3x3`` or why a size does not work."""
    from glsd.config import ModelConfig
    from glsd.models.backbone import check_grid_is_output, meta_backbone, probe_grid
    from glsd.train.preflight import nearest_multiples

    try:
        backbone = meta_backbone(ModelConfig(backbone=name), sizes[0])
        check_grid_is_output(backbone.model)
    except Exception as e:  # noqa: BLE001 - reported on the model's line
        return f"{name:<{width}}  cannot be built: {_first_line(e)}"
    stride = backbone.stride
    cells = [f"stride {stride}" if stride else "stride ?"]
    for size in sizes:
        try:
            gh, gw = probe_grid(backbone, size)
        except Exception as e:  # noqa: BLE001
            cells.append(f"{size}: fails ({_first_line(e)})")
            continue
        off = (f" (not a multiple of {stride}: use {' or '.join(map(str, nearest_multiples(size, stride)))})"
               if stride and size % stride else "")
        cells.append(f"{size}: {gh}x{gw}{off}")
    return f"{name:<{width}}  " + "  ".join(cells)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}" if str(e) else type(e).__name__


def backbone_lines(pattern: Optional[str], sizes: Sequence[int], limit: int) -> list[str]:
    names = backbone_names(pattern)
    if not names:
        return [f"no timm model matches {pattern!r} (try a wildcard pattern such as 'resnet*')"]
    shown = names[:limit] if limit > 0 else names
    width = max(map(len, shown))
    lines = [backbone_line(n, sizes, width) for n in shown]
    if len(shown) < len(names):
        lines.append(f"... {len(names) - len(shown)} more; narrow the pattern or raise --limit")
    return lines
