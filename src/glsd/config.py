"""Typed configuration: dataclasses, YAML presets shipped in the package, dotted overrides.

One system only: a preset (or YAML path) is merged onto the dataclass defaults, then
``key=value`` overrides are applied; every key is checked against the dataclasses so a typo
is an error that lists the valid keys instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

from glsd.errors import ConfigError, short  # noqa: F401 - glsd.config.ConfigError is the same class
from glsd.config_files import (ConfigShapeError, check_shape, dump_yaml_text,  # noqa: F401 - re-exported
                               merge_overrides, parse_overrides, parse_yaml, preset_names, read_yaml)
from glsd.config_types import coerce, reading


@dataclass
class DataConfig:
    # auto: a .zip -> zip, a folder with class sub-folders -> imagefolder, else folder.
    # sample: the small labelled image set shipped with the package (glsd/sample/; needs no
    # data.root), for a first run on any machine.
    source: Literal["auto", "imagefolder", "folder", "zip", "cifar10", "cifar100", "stl10",
                    "fashion_mnist", "synthetic", "sample"] = "auto"
    root: str = ""  # never set by a preset: the user's folder or zip, given on the command line
    split: str = "train"
    download: bool = False
    # Low-data regime: a class-balanced seeded subset (fraction of the split or a count).
    fraction: float = 1.0
    num_images: Optional[int] = None
    subset_seed: int = 0
    on_error: Literal["skip", "fail"] = "skip"
    # One image read taking longer than this is a bad file (a hung network mount, a special
    # file): skipped or failed per on_error, naming it. 0: no limit.
    read_timeout_s: float = 120.0
    # Images of more pixels are refused as decompression bombs (PIL's guard; null: PIL's own
    # limit, about 179 million). Raise it for trusted gigapixel scans or panoramas.
    max_image_pixels: Optional[int] = None
    # A JPEG file larger than needed is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, PIL's
    # draft), both sides still at least the size the pipeline resizes it to: photos of many
    # megapixels decode several times faster. Off: every file decoded at full size.
    jpeg_draft: bool = True
    num_workers: int = 2
    # Where the views are made, not what they are (glsd.data.views, one implementation):
    # cpu: in the loader workers, one batched pass per batch; device: on the training device
    # (the workers only decode). cpu_batched: an alias of cpu (its former name).
    augment_on: Literal["cpu", "cpu_batched", "device"] = "cpu"
    # Synthetic source (tests, benchmarks): images of random shapes, one class per shape.
    synthetic_num_images: int = 64
    synthetic_image_size: int = 40
    synthetic_num_classes: int = 4


@dataclass
class CropConfig:
    global_size: int = 32
    local_size: int = 16
    num_global: int = 2
    num_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    # Colour-jitter strengths: brightness, contrast, saturation (factors in 1 +- s), hue (+- s).
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_p: float = 0.2
    # DINO: blur 1.0 on the first global view, 0.1 on the other globals, 0.5 on locals.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    # DINO: only the second global view may be solarised (pixels >= threshold inverted).
    solarize_p: float = 0.2
    solarize_threshold: int = 128  # in uint8 levels, PIL's default
    # DINO's blur sigma range in output pixels. blur_radius_reference: scale it by
    # view size / reference (224: a 2 px sigma would wipe out a 32 px crop); null: as given
    # (the original's fixed 0.1-2.0 on every view).
    blur_radius: tuple[float, float] = (0.1, 2.0)
    blur_radius_reference: Optional[int] = 224
    # The square side images are decoded to before views are cut (null: the global crop size
    # up to 64 px, else 8/7 of it rounded up to a multiple of 8: 256 for 224 px crops).
    decode_size: Optional[int] = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    # Any timm model name, or "glsd_convnet" (a small conv net for CPU-scale runs).
    backbone: str = "vit_tiny_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # ViT only: overrides the patch size of the named model (e.g. 4 for 32 px images).
    patch_size: Optional[int] = None
    global_feature: Literal["auto", "cls", "pooled"] = "auto"
    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    # The local head runs on every cell of every view: its width sets the cost of the local
    # loss (see the benchmark's local_head rows).
    local_out_dim: Optional[int] = None  # None: same as out_dim
    local_hidden_dim: Optional[int] = None  # None: same as hidden_dim
    local_bottleneck_dim: Optional[int] = None  # None: same as bottleneck_dim
    channels_last: bool = False  # conv backbones: NHWC kernels (faster on CPU with bf16)
    norm_last_layer: bool = False
    drop_path_rate: float = 0.1
    # Start the backbone from these weights instead of random ones: a .safetensors of this
    # architecture (a glsd run's backbone.safetensors or export folder's model.safetensors, or
    # a timm model.safetensors; a classifier head in it is left out). Part of the run's identity.
    init_from: Optional[str] = None


# The local-loss arms, in the order reports list them.
Matching = Literal["none", "similarity", "geometric", "soft_geometric", "hybrid"]
MATCHINGS: tuple[str, ...] = typing.get_args(Matching)
# The evaluations (`glsd eval KIND`, study.evals), here so the CLI and validation need no torch.
EVALUATIONS: tuple[str, ...] = ("knn", "linear", "dense", "seg")


@dataclass
class LossConfig:
    # soft_geometric: the teacher's probabilities bilinearly interpolated at the student
    # cell's centre; hybrid: the most similar of the hybrid_candidates nearest teacher cells.
    # Both keep the geometric arm's validity (threshold).
    matching: Matching = "geometric"
    hybrid_candidates: int = 4
    # "half_diagonal" (the original), a distance in original-image pixels, or "none".
    match_threshold: Union[str, float] = "half_diagonal"
    # all: masked cells count as zero in the mean over student cells (the original);
    # valid: mean over valid matches only (does not shrink with the match rate).
    local_normalize: Literal["all", "valid"] = "all"
    global_weight: Optional[float] = None  # None: 0.5 with a local loss, 1.0 without
    local_weight: Optional[float] = None  # None: 0.5
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    center_momentum: float = 0.9


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: Optional[int] = None  # stop early (tests, benchmarks); schedules keep epochs
    batch_size: int = 64  # per process
    lr: float = 5e-4  # for a global batch of 256; scaled linearly
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs (short schedules)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    clip_grad: Optional[float] = 3.0
    # per_param: each parameter tensor's gradient is clipped to norm clip_grad on its own (DINO's
    # utils.clip_gradients, the original's); global: one norm over all student parameters.
    clip_grad_mode: Literal["per_param", "global"] = "per_param"
    # Weight decay on the weight-norm magnitude of the heads' last layer (it trains when
    # model.norm_last_layer=false): DINO decays every parameter of ndim >= 2, and it is (out, 1).
    decay_weightnorm_magnitude: bool = True
    freeze_last_layer_epochs: float = 1.0
    # Overrides freeze_last_layer_epochs: a study compares subsets of different sizes at one
    # step budget, where "1 epoch" would freeze the prototypes for 7 steps on 1% and 781 on 100%.
    freeze_last_layer_steps: Optional[int] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = 10
    checkpoint_every_epochs: int = 10  # keep a numbered copy every N epochs (0: only last.pt)
    checkpoint_every_steps: int = 0  # refresh last.pt every N steps, across epochs (0: each epoch's end)
    resume: bool = True
    # Resume under changed schedule keys (train.epochs, batch_size, lr, ...): continue the
    # checkpoint under the new schedule. Without it such a resume is refused.
    extend: bool = False
    deterministic: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    every_epochs: int = 0  # online k-NN during pretraining; 0 = off
    model: Literal["teacher", "student"] = "teacher"
    features: Literal["auto", "cls", "pooled"] = "auto"
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    # Labelled train split for k-NN / linear: fraction of the pretraining subset (1.0 = it all).
    train_fraction: Optional[float] = None
    test_split: str = "test"
    max_test_images: Optional[int] = None  # a class-balanced seeded cap on the test split
    image_size: Optional[int] = None  # None: crops.global_size
    linear_epochs: int = 100
    linear_lr: float = 1e-3
    # The probe's minibatch, apart from batch_size (feature extraction's): a larger batch_size
    # for a GPU's throughput must not mean fewer probe steps at the same learning rate.
    linear_batch_size: int = 256
    dense_num_images: int = 256
    dense_seed: int = 0
    # Labelled dense probe (glsd eval seg): mosaics of n x n labelled images, n from seg_tiles,
    # seg_num_train mosaics of train images for the per-cell linear probe, seg_num_test to score.
    seg_tiles: list[int] = field(default_factory=lambda: [2, 3])
    seg_num_train: int = 256
    seg_num_test: int = 128
    seg_steps: int = 1000  # probe steps (1024 cells each), whatever the number of cells
    seg_seed: int = 0


@dataclass
class LogConfig:
    """Where metrics go besides RUN_DIR/metrics.jsonl (always written)."""
    tensorboard: bool = False  # RUN_DIR/tensorboard/ (the optional extra: glsd[tensorboard])
    # Warn when the collapse indicators say so for this many logging steps in a row (0: never).
    collapse_patience: int = 3


@dataclass
class StudyConfig:
    """The grid of ``glsd study`` (command-line flags override it)."""
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1])
    # Any of MATCHINGS, e.g. add soft_geometric and hybrid.
    matchings: list[str] = field(default_factory=lambda: ["none", "similarity", "geometric"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    evals: list[str] = field(default_factory=lambda: ["knn"])
    # Same optimisation budget in every cell: epochs = steps / (steps per epoch of the cell's
    # subset). None: train.epochs as given.
    steps: Optional[int] = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    output_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    preset: str = ""  # the name it came from, for the record

    # Keys whose change makes a checkpoint incompatible (resume refuses, naming the key).
    IDENTITY_SECTIONS: typing.ClassVar[tuple[str, ...]] = ("data", "crops", "model", "loss")


# ----------------------------------------------------------------------------------------
# Loading and overrides

def load_config(name_or_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- preset or YAML file <- ``key=value`` overrides; strictly validated."""
    raw: dict = {}
    preset = ""
    if name_or_path:
        raw, preset = read_yaml(name_or_path)
        try:  # the file's own keys first, so an error in them names the file
            from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{preset}: {e}") from None
    cfg = apply_overrides(raw, overrides)
    if preset and not cfg.preset:
        cfg.preset = preset
    return cfg


def apply_overrides(cfg_or_dict: Union["Config", dict], overrides: Sequence[str] = ()) -> "Config":
    """A config (or a raw mapping, e.g. a run's ``config.yaml``) with dotted ``key=value``
    overrides applied, through the same strict parsing and validation as :func:`load_config`."""
    raw = to_dict(cfg_or_dict) if isinstance(cfg_or_dict, Config) else cfg_or_dict
    cfg = from_dict(merge_overrides(raw, parse_overrides(overrides)))
    validate(cfg)
    return cfg


# Removed keys, ignored when read (old run folders hold them): key -> why it went.
RETIRED_KEYS = {
    "train.compile": "never read by the training loop; `glsd bench --compile` measures torch.compile",
}


def _drop_retired(raw: dict, prefix: str) -> dict:
    """Older versions wrote retired keys at their default (false): their run folders and
    checkpoints must still load. Asking for one is an error that says why it went."""
    out = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if key not in RETIRED_KEYS:
            out[k] = v
        elif reading(v):
            raise ConfigError(f"'{key}' was removed: {RETIRED_KEYS[key]}")
    return out


def from_dict(raw: dict, cls: type = Config, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {short(raw)}")
    if not prefix:  # the whole config, maybe from a checkpoint or a file's metadata: bounded first
        try:
            check_shape(raw)
        except ConfigShapeError as e:
            raise ConfigError(f"the config cannot be read: {e.problem}") from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    raw = _drop_retired(raw, prefix)
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{key}'.{hint} "
                          f"Valid keys under '{prefix.rstrip('.') or 'config'}': {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(raw[name], tp, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(raw[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def validate(cfg: Config) -> None:
    """Range and consistency checks that types cannot express (:mod:`glsd.validation`); each
    message names the key and a fix."""
    from glsd.validation import check_config

    check_config(cfg)


# ----------------------------------------------------------------------------------------
# Serialisation

def to_dict(cfg: Config) -> dict:
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return dump_yaml_text(to_dict(cfg))


def same_root(root: str) -> str:
    """``data.root`` as the place it names (``~/photos`` and ``/home/me/photos`` are one), to
    compare two configs by; "" stays ""."""
    return os.path.realpath(os.path.expanduser(root)) if root else root


def absolute_path(path: str) -> str:
    """``path`` absolute, ``~`` expanded, links kept; "" stays ""."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def with_absolute_paths(cfg: Config) -> Config:
    """``data.root`` and ``output_dir`` made absolute: a run folder's ``config.yaml`` then names
    the same images from any working directory, and ``output_dir="~/runs/x"`` is not a folder
    named ``~`` in the current one."""
    return dataclasses.replace(cfg, output_dir=absolute_path(cfg.output_dir),
                               data=dataclasses.replace(cfg.data, root=absolute_path(cfg.data.root)))
