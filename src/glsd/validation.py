"""Config checks that types cannot express: numeric ranges, and what model construction may
be passed, crop and view-recipe consistency. Pure Python (no torch): called by ``glsd.config.validate``.

Every message names the key, the value and the allowed range.
"""
from __future__ import annotations

import math
from typing import Any

from glsd.config import EVALUATIONS, MATCHINGS
from glsd.errors import ConfigError, short
from glsd.models.families import is_vit, patch_from_name

INF = math.inf
# key -> (low, high, low_open, high_open); None values are allowed where the type is Optional.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "data.num_workers": (0, 256, False, False),
    "data.read_timeout_s": (0, INF, False, True),
    "data.max_image_pixels": (1, INF, False, True),
    "data.synthetic_num_images": (1, 10**7, False, False),  # made in memory: a demo, not a dataset
    "data.synthetic_image_size": (8, 4096, False, False),
    "data.synthetic_num_classes": (1, 8, False, False),
    "crops.global_size": (1, 4096, False, False),
    "crops.local_size": (1, 4096, False, False),
    "crops.flip_p": (0, 1, False, False),
    "crops.color_jitter_p": (0, 1, False, False),
    "crops.grayscale_p": (0, 1, False, False),
    "crops.solarize_p": (0, 1, False, False),
    "model.patch_size": (1, 1024, False, False),
    "model.out_dim": (1, 2**20, False, False),
    "model.hidden_dim": (1, 2**16, False, False),
    "model.bottleneck_dim": (1, 2**16, False, False),
    "model.head_layers": (1, 64, False, False),
    "model.local_out_dim": (1, 2**20, False, False),
    "model.local_hidden_dim": (1, 2**16, False, False),
    "model.local_bottleneck_dim": (1, 2**16, False, False),
    "model.drop_path_rate": (0, 1, False, True),
    "loss.global_weight": (0, INF, False, True),
    "loss.local_weight": (0, INF, False, True),
    "loss.student_temp": (0, INF, True, True),
    "loss.teacher_temp": (0, INF, True, True),
    "loss.warmup_teacher_temp": (0, INF, True, True),
    "loss.warmup_teacher_temp_epochs": (0, INF, False, True),
    "loss.center_momentum": (0, 1, False, False),
    "train.epochs": (1, INF, False, True),
    "train.max_steps": (1, INF, False, True),
    "train.batch_size": (1, INF, False, True),
    "train.lr": (0, INF, True, True),
    "train.min_lr": (0, INF, False, True),
    "train.warmup_epochs": (0, INF, False, True),
    "train.warmup_steps": (0, INF, False, True),
    "train.freeze_last_layer_steps": (0, INF, False, True),
    "train.weight_decay": (0, INF, False, True),
    "train.weight_decay_end": (0, INF, False, True),
    "train.clip_grad": (0, INF, True, True),
    "train.freeze_last_layer_epochs": (0, INF, False, True),
    "train.log_every": (1, INF, False, True),
    "train.checkpoint_every_epochs": (0, INF, False, True),
    "train.checkpoint_every_steps": (0, INF, False, True),
    "eval.every_epochs": (0, INF, False, True),
    "eval.k": (1, INF, False, True),
    "eval.temperature": (0, INF, True, True),
    "eval.batch_size": (1, INF, False, True),
    "eval.image_size": (1, 4096, False, False),
    "eval.linear_epochs": (1, INF, False, True),
    "eval.linear_lr": (0, INF, True, True),
    "eval.linear_batch_size": (1, INF, False, True),
    "eval.dense_num_images": (1, INF, False, True),
    "study.steps": (1, INF, False, True),
    "train.seed": (0, 2**62, False, False),
    "data.subset_seed": (0, 2**62, False, False),
}
TUPLE_RANGES = {"crops.ratio": (0, INF, True, True), "crops.blur_p": (0, 1, False, False),
                "crops.blur_radius": (0, INF, False, True), "crops.std": (0, INF, True, True),
                "crops.color_jitter": (0, INF, False, True)}


def _interval(lo, hi, lo_open, hi_open) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {'inf' if hi == INF else f'{hi:g}'}{')' if hi_open else ']'}"


MAX_INT = 2**62  # no count, size or seed goes near it; beyond, torch and numpy overflow


def _check(key: str, value: Any, spec) -> None:
    lo, hi, lo_open, hi_open = spec
    # integers are finite (and capped at MAX_INT by check_integer_sizes, which runs first)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(f"{key}={short(value, 40)} is out of range: it must be a finite number in "
                          f"{_interval(*spec)}")


def _get(cfg, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_ranges(cfg) -> None:
    """Every numeric key in its range (NaN and inf are never in range)."""
    for key, spec in RANGES.items():
        value = _get(cfg, key)
        if value is not None:
            _check(key, value, spec)
    for key, spec in TUPLE_RANGES.items():
        for v in _get(cfg, key):
            _check(key, v, spec)
    for key in ("crops.mean", "crops.global_scale", "crops.local_scale", "study.fractions"):
        for v in _get(cfg, key):
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ConfigError(f"{key} has {v!r}: every value must be a finite number")
    bad = [f for f in cfg.study.fractions if not 0.0 < f <= 1.0]
    if bad:
        raise ConfigError(f"study.fractions has {bad[0]!r}: fractions of the train split are in "
                          "(0, 1] (5 % is 0.05)")


# ----------------------------------------------------------------------------------------
# What a config may pass to a model constructor

# Keys that make timm (or any constructor) read a file, fetch weights or take a loading recipe.
DENIED_KWARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                 "pretrained_strict", "cache_dir", "file", "url", "hf_hub_id", "state_dict",
                 "weights", "load", "path")
MAX_KWARG_INT = 2**16  # a width or depth beyond this is a typo, and would exhaust memory
MAX_KWARG_VALUES = 10_000  # more values than any architecture takes


def _denied(key: str) -> bool:
    k = key.lower()
    return (k in DENIED_KWARGS or k.startswith("pretrained") or "checkpoint" in k
            or k.endswith(("_path", "_file", "_dir", "_url")))


def _looks_like_path(value: str) -> bool:
    v = value.strip()
    return ("/" in v or "\\" in v or v.startswith((".", "~")) or "://" in v
            or v.lower().endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl",
                                   ".npz", ".npy", ".h5", ".tar", ".zip")))


def check_backbone_kwargs(kwargs: Any, key: str = "model.backbone_kwargs") -> None:
    """Refuse constructor arguments that load files or weights (``checkpoint_path``,
    ``pretrained``, ``pretrained_cfg*``, ``*_path`` ...), path-like strings and absurd sizes."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{key} must be a mapping, got {short(kwargs)}")
    if _count_values(kwargs, MAX_KWARG_VALUES) > MAX_KWARG_VALUES:
        # YAML aliases or a pickle's shared objects: a few bytes that expand to billions
        raise ConfigError(f"{key} holds more than {MAX_KWARG_VALUES:,} values; it takes architecture "
                          "values (widths, depths, flags), not data")
    for name, value in kwargs.items():
        _check_kwarg(f"{key}.{name}", str(name), value)


def _count_values(value: Any, limit: int) -> int:
    """Values in a nested structure of lists and mappings, counting stops past ``limit``
    (a shared list counts each time it appears, as it would be walked)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return count


def _check_kwarg(full: str, name: str, value: Any, depth: int = 0) -> None:
    if _denied(name):
        raise ConfigError(f"{full} is not allowed: a model is built from its architecture "
                          "keys only, never from files or pretrained weights named in a config "
                          "(that would let a config or a checkpoint's metadata load a pickle). "
                          "Remove the key; glsd trains from scratch")
    if depth > 4:
        raise ConfigError(f"{full} is nested too deeply")
    if isinstance(value, str) and _looks_like_path(value):
        raise ConfigError(f"{full}={value!r} looks like a file path or URL; model.backbone_kwargs "
                          "take architecture values only")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int) and abs(value) > MAX_KWARG_INT:
        raise ConfigError(f"{full}={short(value, 40)} is out of range: sizes must be at most {MAX_KWARG_INT}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{full}={value} must be a finite number")
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_kwarg(full, name, v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_kwarg(f"{full}.{k}", str(k), v, depth + 1)
    elif not isinstance(value, (int, float, str)):
        raise ConfigError(f"{full} has a value of type {type(value).__name__}; use numbers, "
                          "strings, lists or mappings")


def _check_view_recipe(c) -> None:
    b, k, sat, hue = c.color_jitter
    if min(b, k, sat) < 0 or not 0.0 <= hue <= 0.5:
        raise ConfigError(f"crops.color_jitter={list(c.color_jitter)}: brightness, contrast and "
                          "saturation strengths must be >= 0 and the hue strength in [0, 0.5]")
    if not 0.0 < c.blur_radius[0] <= c.blur_radius[1]:
        raise ConfigError(f"crops.blur_radius={list(c.blur_radius)} must satisfy 0 < min <= max")
    if c.blur_radius_reference is not None and c.blur_radius_reference <= 0:
        raise ConfigError("crops.blur_radius_reference must be a positive size in pixels, or null "
                          "for radii that do not scale with the view size")
    if c.decode_size is not None and c.decode_size < 1:
        raise ConfigError("crops.decode_size must be a positive size in pixels, or null for the default")
    if not 0 <= c.solarize_threshold <= 256:
        raise ConfigError(f"crops.solarize_threshold={c.solarize_threshold} must be in [0, 256] (uint8 levels)")


def check_integer_sizes(cfg, prefix: str = "") -> None:
    """No integer setting (or one in a list: study.seeds) beyond 2**62, ranged or not: torch
    and numpy overflow on it, far from where it was given."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_integer_sizes(value, f"{key}.")
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
                raise ConfigError(f"{key}={short(v, 40)} is out of range: integers are at most 2**62")


def check_config(cfg) -> None:
    """Every check of a resolved config (called by ``glsd.config.validate``)."""
    check_integer_sizes(cfg)
    check_ranges(cfg)
    check_backbone_kwargs(cfg.model.backbone_kwargs)
    d, c, m, l, t = cfg.data, cfg.crops, cfg.model, cfg.loss, cfg.train
    if not 0.0 < d.fraction <= 1.0:
        raise ConfigError(f"data.fraction={d.fraction} must be in (0, 1]")
    if d.root and d.source in ("synthetic", "sample"):  # else the run silently ignores it
        raise ConfigError(f"data.root={d.root} is not read by data.source={d.source} (its images "
                          f"come from glsd itself); add data.source=auto to use {d.root}")
    if d.num_images is not None and d.num_images <= 0:
        raise ConfigError(f"data.num_images={d.num_images} must be positive (or null for all)")
    if c.num_local < 0:
        raise ConfigError(f"crops.num_local={c.num_local} must be >= 0")
    if c.num_global < 1:
        raise ConfigError(f"crops.num_global={c.num_global} must be >= 1")
    if c.num_global + c.num_local < 2:
        raise ConfigError("need at least two views: raise crops.num_global or crops.num_local")
    for name, (lo, hi) in (("global_scale", c.global_scale), ("local_scale", c.local_scale)):
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"crops.{name}={[lo, hi]} must satisfy 0 < min <= max <= 1")
    if c.num_local and c.local_size > c.global_size:
        raise ConfigError(f"crops.local_size={c.local_size} is larger than crops.global_size="
                          f"{c.global_size}: local crops are the small views (swapped sizes?)")
    _check_view_recipe(c)
    patch = (m.patch_size if is_vit(m.backbone) else None) or patch_from_name(m.backbone)
    if patch is not None:
        sizes = [("crops.global_size", c.global_size), ("crops.local_size", c.local_size)]
        if cfg.eval.image_size is not None:
            sizes.append(("eval.image_size", cfg.eval.image_size))
        for name, size in sizes:
            if size % patch:
                lower = size // patch * patch
                nearest = f"{lower} or {lower + patch}" if lower else f"{patch}"
                raise ConfigError(f"{name}={size} is not a multiple of the patch size "
                                  f"(model.patch_size={patch}, {m.backbone}): nearest valid sizes "
                                  f"{nearest}; or another model.patch_size")
    local = l.matching != "none"
    weights = (l.global_weight, l.local_weight if local else 0.0)
    if all(w == 0 for w in weights):  # None is a default weight > 0; all 0: weight decay alone
        raise ConfigError(f"loss.global_weight={l.global_weight:g} with "
                          + (f"loss.local_weight={l.local_weight:g}" if local
                             else "loss.matching=none (no local loss)")
                          + ": the loss is always 0 and nothing is learned; give a weight > 0")
    if isinstance(l.match_threshold, str) and l.match_threshold not in ("half_diagonal", "none"):
        raise ConfigError(f"loss.match_threshold={l.match_threshold!r}: use half_diagonal, none, "
                          "or a distance in original-image pixels")
    if isinstance(l.match_threshold, float):  # the other form of this key: its own check
        _check("loss.match_threshold", l.match_threshold, (0, INF, True, True))
    if l.hybrid_candidates < 1:
        raise ConfigError(f"loss.hybrid_candidates={l.hybrid_candidates} must be >= 1 (the number "
                          "of nearest teacher cells the hybrid matching picks the most similar of)")
    if t.batch_size < 1 or t.epochs < 1:
        raise ConfigError("train.batch_size and train.epochs must be >= 1")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    if not 0.0 <= t.momentum_teacher <= t.momentum_teacher_end <= 1.0:
        raise ConfigError("need 0 <= train.momentum_teacher <= train.momentum_teacher_end <= 1")
    if cfg.eval.train_fraction is not None and not 0.0 < cfg.eval.train_fraction <= 1.0:
        raise ConfigError("eval.train_fraction must be in (0, 1]")
    bad = [m for m in cfg.study.matchings if m not in MATCHINGS]
    if bad:
        raise ConfigError(f"study.matchings has {bad}; valid: {', '.join(MATCHINGS)}")
    ev = cfg.eval
    if not ev.seg_tiles or min(ev.seg_tiles) < 1 or min(ev.seg_num_train, ev.seg_num_test, ev.seg_steps) < 1:
        raise ConfigError("eval.seg_tiles (tiles per side, e.g. [2, 3]), eval.seg_num_train, "
                          "eval.seg_num_test and eval.seg_steps must be >= 1")
    bad = [e for e in cfg.study.evals if e not in EVALUATIONS]
    if bad:
        raise ConfigError(f"study.evals has {bad}; valid: {', '.join(EVALUATIONS)}")
