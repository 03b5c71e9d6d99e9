"""Checks before the first step (and before the run folder is touched): set-ups that would
train silently wrong, or fail minutes in, are refused here with the fix named.

- the feature grid of every crop size: a multiple of the backbone's stride, a size the
  backbone can take at all, and at least 2x2 cells when a local loss is on;
- a learning-rate warm-up longer than the run: **scaled** to a tenth of the run (DINO's 10 of
  100 epochs) and said so, because refusing would break every quick trial of a preset with
  ``train.epochs=1``; the scaled value is what ``config.yaml`` records;
- a resume under changed schedule keys: refused, naming them, unless ``train.extend=true``
  asks to continue the checkpoint under the new schedule; a run recorded before
  ``train.clip_grad_mode`` / ``train.decay_weightnorm_magnitude`` existed counts as trained
  with a global norm and an undecayed magnitude, and the latter never changes on resume.

Shapes are probed on the meta device: no weights are allocated and no real forward runs, so
the checks cost milliseconds even for a Swin-B.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from glsd.config import Config, ConfigError, from_dict
from glsd.config_compare import diff_keys, identity
from glsd.config_files import load_yaml
from glsd.data.layout import left_out_note
from glsd.data.subset import SUBSET_FILE, read_subset
from glsd.data.sources import ImageSource, Unreadable, balanced_subset
from glsd.errors import DataError
from glsd.models.families import is_vit
from glsd.run_layout import LAST_CHECKPOINT
from glsd.train.checkpoint import checkpoint_config
from glsd.train.schedules import freeze_last_layer_steps, peak_lr, teacher_temp_warmup_steps, warmup_steps

# The train keys that define the per-step schedules of a run (lr, wd, momentum, warm-ups);
# max_steps only stops early and is free to change.
SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "warmup_steps",
                 "weight_decay", "weight_decay_end", "momentum_teacher", "momentum_teacher_end",
                 "freeze_last_layer_epochs", "freeze_last_layer_steps", "clip_grad", "clip_grad_mode")
# Keys the optimizer state depends on (which parameters sit in which group): never changed on resume.
FIXED_KEYS = ("decay_weightnorm_magnitude",)
# The rule of runs recorded before these keys existed (a global norm, an undecayed magnitude):
# resuming one under today's defaults would change its optimisation mid-run.
BEFORE_KEYS = {"clip_grad_mode": "global", "decay_weightnorm_magnitude": False}
WARMUP_FRACTION = 0.1  # of the run, when the configured warm-up does not fit in it
MIN_CELLS = 2  # per side: a 1x1 grid turns the local loss into a second global loss


@dataclass
class Plan:
    """What the checks found; the console's start summary prints it."""
    grids: dict[str, tuple[int, int]]  # "global 32 px" -> (gh, gw)
    stride: Optional[int]
    num_images: int  # the pretraining subset
    steps_per_epoch: int
    total_steps: int
    notes: list[str] = field(default_factory=list)  # warnings already acted on


def preflight(cfg: Config, source: ImageSource, world_size: int = 1) -> tuple[Config, Plan]:
    """Raise ConfigError naming every problem (and its fix); return the config to run (the
    warm-up possibly scaled) and the plan."""
    grids, stride = check_grids(cfg)
    recorded = recorded_subset(cfg)  # read once: an ImageNet run's list is tens of MB of JSON
    n = planned_images(cfg, source, recorded)
    global_batch = cfg.train.batch_size * world_size
    if n < global_batch:  # refused here, before the run folder is touched
        raise ConfigError(f"{n} images are fewer than one global batch of {global_batch} "
                          f"(train.batch_size={cfg.train.batch_size} x {world_size} process"
                          f"{'es' if world_size > 1 else ''}); lower train.batch_size or use more data")
    steps_per_epoch = n // global_batch
    notes: list[str] = []
    cfg, note = scale_warmup(cfg, steps_per_epoch)
    notes += [note] if note else []
    derived = ("warmup_epochs",) if note else ()  # set by the scaling above, not by the user
    notes += short_run_notes(cfg, steps_per_epoch)
    peak = peak_lr(cfg, global_batch)
    if cfg.train.min_lr > peak:
        notes.append(f"train.min_lr={cfg.train.min_lr:g} is above the peak learning rate {peak:.3g} "
                     f"(train.lr={cfg.train.lr:g} x {global_batch}/256): the cosine schedule raises "
                     "the learning rate over the run; lower train.min_lr")
    notes += temperature_notes(cfg) + ignored_key_notes(cfg)
    if cfg.data.num_images is not None and cfg.data.num_images > len(source):
        notes.append(f"data.num_images={cfg.data.num_images} is more than the {len(source)} images there: "
                     "the run uses them all")
    notes += image_size_notes(cfg, source) + added_images_notes(cfg, source, recorded)
    left_out = left_out_note(f"data.root={cfg.data.root}", source.undecodable)
    notes += [left_out] if left_out else []
    notes += check_resume_schedule(cfg, Path(cfg.output_dir), derived)
    from glsd.eval.online import check_online_knn  # the splits the training loop will score on

    check_online_knn(cfg, source)
    return cfg, Plan(grids, stride, n, steps_per_epoch, cfg.train.epochs * steps_per_epoch, notes)


# ----------------------------------------------------------------------------------------
# Crop sizes and feature grids

def crop_sizes(cfg: Config) -> dict[str, int]:
    """{"global_size": 32, "local_size": 16} (local only when local crops are drawn)."""
    sizes = {"global_size": cfg.crops.global_size}
    if cfg.crops.num_local:
        sizes["local_size"] = cfg.crops.local_size
    return sizes


def nearest_multiples(size: int, stride: int) -> list[int]:
    lo = (size // stride) * stride
    return [s for s in (lo, lo + stride) if s > 0]


def minimum_size(backbone, stride: Optional[int], limit: int = 1024) -> Optional[int]:
    """The smallest square crop (a multiple of the stride) the backbone takes, or None."""
    from glsd.models.backbone import probe_grid

    step = stride or 1
    for size in range(step, limit + 1, step):
        try:
            probe_grid(backbone, size)
            return size
        except Exception:  # noqa: BLE001 - any failure means: not this size
            continue
    return None


def takes_one_size(backbone, size: int, stride: Optional[int]) -> bool:
    """Whether the next larger size fails too: a model fixed at one input size."""
    from glsd.models.backbone import probe_grid

    try:
        probe_grid(backbone, size + (stride or 1))
        return False
    except Exception:  # noqa: BLE001 - any failure means: not this size
        return True


def check_grids(cfg: Config) -> tuple[dict[str, tuple[int, int]], Optional[int]]:
    """Grid per crop size; ConfigError listing every size that is off-stride, too small for
    the backbone, or (with a local loss) below 2x2 cells."""
    from glsd.models.backbone import check_grid_is_output, meta_backbone, probe_grid

    m = cfg.model
    backbone = meta_backbone(m, cfg.crops.global_size)
    check_grid_is_output(backbone.model)
    stride, name = backbone.stride, m.backbone
    problems, grids = [], {}
    for key, size in crop_sizes(cfg).items():
        try:
            grid = probe_grid(backbone, size)
        except Exception as e:  # noqa: BLE001 - the model's own error, reported with the fix
            low = minimum_size(backbone, stride)
            if low is not None and takes_one_size(backbone, low, stride):
                problems.append(f"{name} takes only {low} px crops (it is built for the global crop "
                                f"and has no dynamic input size), so crops.{key}={size} cannot run; "
                                "pick a model.backbone that takes any multiple of its stride "
                                "(`glsd backbones PATTERN` lists both crop sizes per model)")
                continue
            floor = f"its minimum is {low} px" if low else "no size up to 1024 px worked"
            problems.append(f"{name} cannot take crops.{key}={size} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}); {floor}: raise crops.{key} or pick "
                            "another model.backbone")
            continue
        grids[f"{key.split('_')[0]} {size} px"] = grid
        if stride and size % stride:
            valid = " or ".join(str(s) for s in nearest_multiples(size, stride))
            problems.append(f"crops.{key}={size} is not a multiple of {name}'s stride {stride}, so the "
                            f"feature grid does not tile the crop (the cell centres used for matching are "
                            f"misplaced); nearest valid sizes: {valid}")
        if cfg.loss.matching != "none" and min(grid) < MIN_CELLS:
            need = MIN_CELLS * (stride or size)
            problems.append(
                f"crops.{key}={size} gives a {grid[0]}x{grid[1]} feature grid with {name}"
                f"{f' (stride {stride})' if stride else ''}: loss.matching={cfg.loss.matching} needs at "
                f"least {MIN_CELLS}x{MIN_CELLS} cells (a 1x1 grid makes the local loss a second global "
                f"loss). Fix: crops of at least {need} px, a backbone of smaller stride (glsd_convnet, "
                "a ViT with model.patch_size), or loss.matching=none")
    if problems:
        if not cfg.preset or cfg.preset.endswith((".yaml", ".yml")):  # no preset under it
            problems.append("this config names no preset, so the keys it does not set are glsd's "
                            "bare defaults (ViT-Tiny/16 on 32/16 px crops); start from one with "
                            "`preset: NAME` in the file (`glsd presets` lists them)")
        raise ConfigError("pre-flight check failed:\n  - " + "\n  - ".join(problems))
    return grids, stride


# ----------------------------------------------------------------------------------------
# Schedules

def planned_images(cfg: Config, source: ImageSource, recorded: Optional[dict]) -> int:
    """How many images the run pretrains on: a resumed run's ``recorded`` subset (images added
    to the folder since do not join it), else the subset drawn now."""
    if recorded is not None:
        return len(recorded["keys"])
    return len(balanced_subset(source, cfg.data.fraction, cfg.data.num_images, cfg.data.subset_seed))


def recorded_subset(cfg: Config) -> Optional[dict]:
    """The subset.json of the run this command resumes; None when it starts afresh."""
    run = Path(cfg.output_dir)  # resumed only from a checkpoint: else the folder is moved aside
    resumes = cfg.train.resume and (run / LAST_CHECKPOINT).is_file()
    return read_subset(run / SUBSET_FILE) if resumes else None


def added_images_notes(cfg: Config, source: ImageSource, recorded: Optional[dict]) -> list[str]:
    """A run on all of a folder (as the run itself chose, in its config.yaml), resumed after
    images were added to it (``recorded``: its subset.json): they are not used."""
    chosen = ((_recorded_config(Path(cfg.output_dir) / "config.yaml") or {}).get("data") or {})
    if recorded is None or chosen.get("fraction", 1.0) != 1.0 or chosen.get("num_images") is not None:
        return []
    known = set(recorded["keys"])
    added = sum(key not in known for key in source.keys)
    if not added:
        return []
    return [f"{added:,} image{'s' if added > 1 else ''} added to the data since the run started "
            f"{'are' if added > 1 else 'is'} not used: a resumed run pretrains on the list in its "
            f"{SUBSET_FILE}; to use them, start afresh (train.resume=false moves this run aside, "
            "or a new output_dir)"]


def scale_warmup(cfg: Config, steps_per_epoch: int) -> tuple[Config, Optional[str]]:
    """A warm-up that would not end within the run is scaled to WARMUP_FRACTION of it, recorded
    in epochs: a resume under another world size (other steps per epoch) scales it to the
    same recorded value, not to another step count that would read as a changed schedule."""
    total = cfg.train.epochs * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    if total == 0 or warmup < total:
        return cfg, None
    epochs = WARMUP_FRACTION * cfg.train.epochs
    scaled = warmup_steps(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, warmup_steps=None, warmup_epochs=epochs)), steps_per_epoch)
    asked = (f"train.warmup_steps={cfg.train.warmup_steps}" if cfg.train.warmup_steps is not None
             else f"train.warmup_epochs={cfg.train.warmup_epochs:g}")
    to = (f"{scaled} step{'' if scaled == 1 else 's'}" if scaled else "0 steps: no warm-up")
    as_long = "as long as" if warmup == total else "longer than"
    note = (f"warm-up {asked} ({warmup} step{'' if warmup == 1 else 's'}) is {as_long} the run "
            f"({total} step{'' if total == 1 else 's'}): scaled to "
            f"{to} (train.warmup_epochs={epochs:g}, {WARMUP_FRACTION:.0%} of the run); to choose, "
            f"set train.warmup_steps below {total}")
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, warmup_steps=None, warmup_epochs=epochs)), note


def raise_unreadable(source: ImageSource, keys: list[str]) -> None:
    """Every image of an even sample failed to decode: refused before the first step, not
    after an epoch of skipped reads."""
    again = source.load_or_why(keys[0])  # under the read deadline too
    why = (again.reason if isinstance(again, Unreadable)
           else "it reads now: the files may be changing or on a slow disk")
    raise DataError(f"none of {len(keys)} images read from {source.name} (evenly spaced through "
                    f"its {len(source):,}) could be decoded; e.g. {keys[0]!r}: {why}. Check that "
                    "the files open in an image viewer, or point data.root at the images")


def image_size_notes(cfg: Config, source: ImageSource, sample: int = 16) -> list[str]:
    """Said when the images are much smaller than the global crops (photos of 96 px under a
    224 px preset): every view is then an upscaled blur of a few pixels. A few images, evenly
    spaced through the source, are read to tell."""
    if not len(source) or not source.name.startswith(("folder:", "imagefolder:", "zip:")):
        return []  # generated or dataset images: their size is the dataset's, nothing to find
    keys = source.keys[::max(1, len(source) // sample)][:sample]
    images = [source.load(k) for k in keys]
    if not any(images):
        raise_unreadable(source, keys)
    sides = sorted(min(img.size) for img in images if img is not None)
    median = sides[len(sides) // 2]
    if median * 2 > cfg.crops.global_size:
        return []
    return [f"the images are small for the crops: a median short side of {median} px (of {len(sides)} "
            f"read) under crops.global_size={cfg.crops.global_size}, so every view is upscaled over "
            f"{cfg.crops.global_size // median}x; crop sizes nearer the images' (and a backbone of "
            "matching stride) learn from real pixels"]


def ignored_key_notes(cfg: Config) -> list[str]:
    """Keys a run does not read, said (not refused: a stored run that has them stays usable)."""
    m, d, notes = cfg.model, cfg.data, []
    if m.patch_size is not None and not is_vit(m.backbone):  # timm_kwargs gives it to ViTs only
        notes.append(f"model.patch_size={m.patch_size} is ignored: it is read by ViT backbones "
                     f"only and {m.backbone} has its own (model.patch_size=null says so)")
    if d.num_images is not None and d.fraction != 1.0:
        notes.append(f"data.fraction={d.fraction:g} is ignored: data.num_images={d.num_images} "
                     "chooses the subset")
    return notes


def temperature_notes(cfg: Config) -> list[str]:
    """A teacher no sharper than the student: allowed (an ablation may want it), said."""
    lo = cfg.loss
    if max(lo.teacher_temp, lo.warmup_teacher_temp) < lo.student_temp:
        return []
    return [f"the teacher's temperature (loss.teacher_temp={lo.teacher_temp:g}, warm-up "
            f"{lo.warmup_teacher_temp:g}) is not below the student's (loss.student_temp="
            f"{lo.student_temp:g}): its targets are no sharper than the student's outputs, the "
            "sharpening DINO relies on against collapse (DINO: teacher 0.04-0.07, student 0.1)"]


def short_run_notes(cfg: Config, steps_per_epoch: int) -> list[str]:
    """Settings made for long runs that a short one never gets past (said, not changed)."""
    t, lo = cfg.train, cfg.loss
    total = t.epochs * steps_per_epoch
    stop = min(total, t.max_steps) if t.max_steps else total
    notes = []
    freeze = freeze_last_layer_steps(cfg, steps_per_epoch)
    if stop and freeze >= stop:
        notes.append(f"the prototypes are frozen for {freeze} steps, the whole run ({stop}): they "
                     "never train; lower train.freeze_last_layer_epochs or set "
                     "train.freeze_last_layer_steps")
    temp_warmup = teacher_temp_warmup_steps(cfg, steps_per_epoch)
    squeezed = min(temp_warmup, total)  # the schedule fits a longer warm-up into the run
    if stop and lo.warmup_teacher_temp != lo.teacher_temp:
        if stop < squeezed:
            notes.append(f"the run stops at step {stop}, inside the teacher temperature's "
                         f"{squeezed}-step warm-up: it never reaches loss.teacher_temp="
                         f"{lo.teacher_temp:g}; lower loss.warmup_teacher_temp_epochs")
        elif temp_warmup > total:
            notes.append(f"the teacher temperature's warm-up ({temp_warmup} steps) is longer than "
                         f"the run ({total}), so it is spread over the whole run: the teacher "
                         f"reaches loss.teacher_temp={lo.teacher_temp:g} only at the last step; "
                         "lower loss.warmup_teacher_temp_epochs")
    warmup = warmup_steps(cfg, steps_per_epoch)
    if t.max_steps and t.max_steps < min(warmup, total):
        notes.append(f"train.max_steps={t.max_steps} stops inside the learning-rate warm-up "
                     f"({warmup} steps of the {total}-step schedule): the learning rate stays "
                     "near 0 (a smoke test; for a short real run lower train.epochs instead)")
    return notes


def _recorded_config(path: Path) -> Optional[dict]:
    try:
        raw = load_yaml(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def check_resume_schedule(cfg: Config, run_dir: Path, derived: tuple = ()) -> list[str]:
    """A resume under changed schedule keys continues only with train.extend=true. The run
    folder's config.yaml is the config its checkpoint was trained under (written at start);
    without a readable one (a checkpoint copied elsewhere), the checkpoint's own."""
    last = run_dir / LAST_CHECKPOINT
    if not (cfg.train.resume and last.is_file()):
        return []
    raw = _recorded_config(run_dir / "config.yaml") or checkpoint_config(last)
    try:
        if raw is None or diff_keys(identity(from_dict(raw)), identity(cfg)):
            return []  # another run altogether: the run folder refuses it, naming those keys
    except ConfigError:
        return []  # a config of another version: the checkpoint's own config check still runs
    old = {**BEFORE_KEYS, **raw.get("train", {})}
    new = dataclasses.asdict(cfg.train)
    fixed = [f"train.{k}={str(old[k]).lower()}" for k in FIXED_KEYS if old[k] != new[k]]
    if fixed:
        raise ConfigError(f"{run_dir} was trained with {' '.join(fixed)}: its optimizer state "
                          f"holds the parameter groups that follow from it. Resume with "
                          f"{' '.join(fixed)}, use a new output_dir, or train.resume=false to "
                          "start fresh.")
    changed = [f"train.{k}: {old[k]!r} -> {new[k]!r}{' (scaled with the run length)' if k in derived else ''}"
               for k in SCHEDULE_KEYS if k in old and old[k] != new[k]]
    if not changed:
        return []
    if not cfg.train.extend:
        raise ConfigError(
            f"{run_dir} was trained under another schedule ({'; '.join(changed)}). Resuming would "
            "continue its checkpoint under schedules it was not trained with (and a finished run "
            "would do zero new steps). Add train.extend=true to continue from the checkpoint under "
            "the new schedule, use a new output_dir, or train.resume=false to start fresh.")
    return [f"train.extend=true: the checkpoint continues under the new schedule ({'; '.join(changed)})"]
