"""The images an evaluation reads: each split opened once per process, the run's pretraining
subset (``subset.json``) and its checks (labelled, held out, the same classes), or another
labelled set named on the command line (:mod:`glsd.eval.runner` documents the rules)."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from glsd.config import Config, ConfigError, DataConfig
from glsd.data.subset import SUBSET_FILE, read_subset
from glsd.data.sources import ImageSource, balanced_subset, detect_kind, open_source
from glsd.errors import MissingSplit
from glsd.eval.data_spec import data_config

SOURCES: dict[tuple[str, str], ImageSource] = {}  # (data settings, split) -> source


def open_cached(cfg: Union[Config, DataConfig], split: str) -> ImageSource:
    """``open_source(cfg.data, split)``, opened once per process (datasets load into memory)."""
    data_cfg = cfg.data if isinstance(cfg, Config) else cfg
    key = _cache_key(data_cfg, split)
    if key not in SOURCES:
        SOURCES[key] = open_source(data_cfg, split)
    return SOURCES[key]


def remember_source(data_cfg: DataConfig, source: ImageSource) -> None:
    """Cache ``open_source(data_cfg)`` opened elsewhere (the pretraining images), replacing an
    older listing: a folder of a million files is listed once per run, not once per reader."""
    SOURCES[_cache_key(data_cfg, data_cfg.split)] = source


def _cache_key(data_cfg: DataConfig, split: str) -> tuple[str, str]:
    data = dataclasses.asdict(data_cfg)
    for k in ("num_workers", "on_error", "split"):
        data.pop(k)  # they do not change which images a split holds
    return json.dumps(data, sort_keys=True), split


def open_test_split(cfg: Union[Config, DataConfig], split: str) -> ImageSource:
    """open_cached of ``eval.test_split``: a missing split names that key, not data.split
    (an ImageNet folder has val/, not test/)."""
    try:
        return open_cached(cfg, split)
    except MissingSplit as e:
        raise e.asked_by("eval.test_split") from None


# ----------------------------------------------------------------------------------------
# Data

def train_subset(full: ImageSource, subset: Optional[dict], cfg: Config) -> ImageSource:
    """The pretraining images of ``full`` (all without a subset), then ``eval.train_fraction``."""
    src = full
    if subset is not None:
        if subset.get("source") and subset["source"] != full.name:
            warnings.warn(f"subset.json was written for source {subset['source']!r}, evaluating "
                          f"on {full.name!r} (moved data?); its keys are used as recorded")
        src = full.subset([str(k) for k in subset["keys"]])
        if subset.get("labels") is not None and [int(y) for y in subset["labels"]] != src.labels:
            raise ConfigError(f"labels in subset.json differ from those of {full.name}; the data "
                              "changed since the run. Restore it, or delete subset.json")
    fraction = cfg.eval.train_fraction
    if fraction is not None and fraction < 1.0:
        src = src.subset(balanced_subset(src, fraction=fraction, seed=cfg.data.subset_seed))
    return src


def eval_sources(cfg: Config, base: Path, train_data: Optional[str] = None, test_data: Optional[str] = None,
                 overrides: Sequence[str] = (), purpose: str = "k-NN and linear evaluation",
                 other_set_hint: bool = True) -> tuple[ImageSource, ImageSource, dict]:
    """(labelled train source, test source, record of what they are) for k-NN / linear.

    ``train_data`` / ``test_data``: another labelled set (module docstring); ``overrides``
    gives their ``data.*`` keys. ``other_set_hint``: errors name ``glsd eval``'s
    ``--train-data`` / ``--test-data`` (not for callers without those flags).
    """
    if train_data is not None:
        train_cfg, subset = data_config(train_data, cfg.data, overrides), None
        train_split = train_cfg.split
    else:
        train_cfg, subset = cfg.data, read_subset(base / SUBSET_FILE)
        train_split = str(subset.get("split") or cfg.data.split) if subset else cfg.data.split
    test_spec = test_data if test_data is not None else train_data
    test_cfg = cfg.data if test_spec is None else data_config(test_spec, cfg.data, overrides)
    full = _open_named(train_cfg, train_split, train_data and f"--train-data {train_data}")
    test = _open_named(test_cfg, cfg.eval.test_split, test_spec and f"--test-data {test_spec}",
                       opener=open_test_split)
    other_hint = ("; or give the held-out images with --test-data Y (or, as --train-data, the "
                  "folder that holds both train/ and test/)" if test_data is None else "")
    if not other_set_hint:
        other_hint = ""
    elif train_data is None:
        other_hint = "; or evaluate on another labelled set: --train-data X --test-data Y"
    train, test = held_out_pair(full, test, subset, cfg, train_split, hint=other_hint, purpose=purpose)
    record = {**data_record(cfg), "train_data": train_data, "test_data": test_data,
              "train_source": full.name, "test_source": test.name,
              "train_split": train_split, "test_split": cfg.eval.test_split,
              "subset_file": str(base / SUBSET_FILE) if subset else None,
              "subset_size": len(subset["keys"]) if subset else None,
              "max_test_images": cfg.eval.max_test_images,
              "n_train": len(train), "n_test": len(test), "num_classes": len(full.classes)}
    return train, test, record


def held_out_pair(full: ImageSource, test: ImageSource, subset: Optional[dict], cfg: Config,
                  train_split: str, hint: str = "", purpose: str = "k-NN and linear evaluation"
                  ) -> tuple[ImageSource, ImageSource]:
    """(the pretraining images of ``full``, at most ``eval.max_test_images`` of ``test``), once
    the two are checked to be a labelled, held-out pair: what every k-NN scores on, offline or
    online, so that their numbers agree."""
    check_split_pair(full, test, train_split, cfg.eval.test_split, hint=hint, purpose=purpose)
    return train_subset(full, subset, cfg), cap_test(test, cfg)


def _open_named(data_cfg: DataConfig, split: str, what: Optional[str], opener=open_cached) -> ImageSource:
    """open_cached (or ``opener``), with errors naming the command-line flag that gave the data."""
    try:
        return opener(data_cfg, split)
    except ConfigError as e:
        if what is None:
            raise
        raise ConfigError(f"{what}: {e}") from None


def cap_test(test: ImageSource, cfg: Config) -> ImageSource:
    """At most ``eval.max_test_images`` of the test source, class-balanced and seeded."""
    cap = cfg.eval.max_test_images
    if cap is None or cap >= len(test):
        return test
    if cap < 1:
        raise ConfigError(f"eval.max_test_images={cap} must be >= 1 (or null for all)")
    return test.subset(balanced_subset(test, num_images=cap, seed=cfg.data.subset_seed))


def check_split_pair(train: ImageSource, test: ImageSource, train_split: str, test_split: str,
                     hint: str = "", purpose: str = "k-NN and linear evaluation") -> None:
    """Labelled, held-out, with the same classes: else a ConfigError naming the fix."""
    need = "need" if " and " in purpose else "needs"
    for src in (train, test):
        if not src.classes or any(y < 0 for y in src.labels):
            raise ConfigError(f"{src.name} is unlabeled; {purpose} {need} labels "
                              f"(an image folder with class sub-folders, or a dataset){why_flat(src)}{hint}"
                              "; without labels, `glsd eval dense RUN_DIR` scores the local features")
    if test.identity == train.identity and test_split != train_split:  # no split folders there
        raise ConfigError(f"{train.name} has no {test_split!r} split folder beside {train_split!r} "
                          f"ones, so both read the same images; {purpose} {need} held-out labelled images: put "
                          f"them in {train_split}/ and {test_split}/ sub-folders, or set "
                          f"eval.test_split to the held-out folder's name (e.g. 'val'){hint}")
    if test.identity == train.identity:  # resolved: ./pets and $PWD/pets are the same images
        raise ConfigError(f"the test split ({test_split!r}) and the train split ({train_split!r}) "
                          f"are the same images ({train.name}); set eval.test_split to a "
                          f"held-out split (e.g. a 'test' or 'val' sub-folder){hint}")
    if train.classes != test.classes:
        raise ConfigError(f"train ({train.name}) and test ({test.name}) have different classes "
                          f"({len(train.classes)} vs {len(test.classes)}), so labels do not line up")


def why_flat(src: ImageSource) -> str:
    """Why a folder with class sub-folders was read as one unlabelled folder: images at its top."""
    if not src.name.startswith("folder:"):
        return ""
    root = Path(src.name[len("folder:"):])
    kind, why = detect_kind(str(root)) if root.is_dir() else ("", "")
    has_classes = root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    if kind != "folder" or not has_classes:
        return ""
    return (f". It has sub-folders, but data.source=auto reads it as one unlabelled folder because "
            f"of its {why}: move them into class folders, or add data.source=imagefolder")


def data_record(cfg: Config) -> dict:
    d = cfg.data
    return {"source": d.source, "root": d.root, "data_fraction": d.fraction,
            "data_num_images": d.num_images, "train_fraction": cfg.eval.train_fraction}
