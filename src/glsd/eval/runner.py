"""Evaluation entry points: ``run_eval`` (k-NN, linear probe, dense, seg) and ``online_knn``.

Evaluation data follow the run: the labelled train split restricted to exactly the images of
``RUN_DIR/subset.json`` (the pretraining images; the whole train split when there is no such
file), optionally cut to a class-balanced ``eval.train_fraction`` of them, and the full
``eval.test_split`` (or a class-balanced ``eval.max_test_images`` of it). Data come from the run
config's ``data`` section with the split replaced. Another labelled set replaces them with
``train_data`` / ``test_data`` (a folder, a zip or a dataset name, read as ``glsd embed``
reads DATA): the train split of ``train_data`` (``data.split``), all of it, since the
pretraining subset belongs to other data, and the ``eval.test_split`` of ``test_data``
(default: ``train_data``).
Results are written to ``RUN_DIR/eval/<kind>[-student|-random-init][-on-<data>].json`` (for a
bare safetensors file, to an ``eval/`` folder beside it; ``-on-<data>`` names another set).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from glsd.config import EVALUATIONS, Config, ConfigError, DataConfig, to_dict
from glsd.errors import MissingSplit
from glsd.data.loader import SUBSET_FILE, read_subset
from glsd.data.sources import SPLIT_NAMES, ImageSource, balanced_subset, detect_kind, open_source
from glsd.eval.data_spec import data_config
from glsd.eval.dense import run_dense
from glsd.eval.features import Device, extract_features, load_backbone, resolve_feature
from glsd.eval.knn import knn_classify
from glsd.eval.linear import linear_probe
from glsd.eval.seg import run_seg
from glsd.models.backbone import Backbone
from glsd.train.distributed import rank_world
from glsd.train.lock import locks_eval_output
from glsd.utils.device import resolve_device as _resolve_device
from glsd.utils.io import atomic_write

KINDS = EVALUATIONS
KNN_KS = (10, 20, 100, 200)

_SOURCES: dict[tuple[str, str], ImageSource] = {}
_ONLINE: dict = {}


def open_cached(cfg: Union[Config, DataConfig], split: str) -> ImageSource:
    """``open_source(cfg.data, split)``, opened once per process (datasets load into memory)."""
    data_cfg = cfg.data if isinstance(cfg, Config) else cfg
    data = dataclasses.asdict(data_cfg)
    for k in ("num_workers", "on_error", "split"):
        data.pop(k)  # they do not change which images a split holds
    key = (json.dumps(data, sort_keys=True), split)
    if key not in _SOURCES:
        _SOURCES[key] = open_source(data_cfg, split)
    return _SOURCES[key]


def open_test_split(cfg: Union[Config, DataConfig], split: str) -> ImageSource:
    """open_cached of ``eval.test_split``: a missing split names that key, not data.split
    (an ImageNet folder has val/, not test/)."""
    try:
        return open_cached(cfg, split)
    except MissingSplit as e:
        raise e.asked_by("eval.test_split") from None


def clear_cache() -> None:
    _SOURCES.clear()
    _ONLINE.clear()


def eval_device(device: Device, cfg: Config) -> torch.device:
    """The device argument, "auto" deferring to the config's ``device`` (then
    :func:`glsd.utils.device.resolve_device`)."""
    return _resolve_device(cfg.device if str(device) == "auto" else device)


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
                 overrides: Sequence[str] = ()) -> tuple[ImageSource, ImageSource, dict]:
    """(labelled train source, test source, record of what they are) for k-NN / linear.

    ``train_data`` / ``test_data``: another labelled set (module docstring); ``overrides``
    gives their ``data.*`` keys.
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
    test = cap_test(_open_named(test_cfg, cfg.eval.test_split, test_spec and f"--test-data {test_spec}",
                                opener=open_test_split), cfg)
    other_hint = ("; or give the held-out images with --test-data Y (or, as --train-data, the "
                  "folder that holds both train/ and test/)" if test_data is None else "")
    check_split_pair(full, test, train_split, cfg.eval.test_split,
                     hint=other_hint if train_data is not None else "; or evaluate on another "
                     "labelled set: --train-data X --test-data Y")
    train = train_subset(full, subset, cfg)
    record = {**_data_record(cfg), "train_data": train_data, "test_data": test_data,
              "train_source": full.name, "test_source": test.name,
              "train_split": train_split, "test_split": cfg.eval.test_split,
              "subset_file": str(base / SUBSET_FILE) if subset else None,
              "subset_size": len(subset["keys"]) if subset else None,
              "max_test_images": cfg.eval.max_test_images,
              "n_train": len(train), "n_test": len(test), "num_classes": len(full.classes)}
    return train, test, record


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
                     hint: str = "") -> None:
    """Labelled, held-out, with the same classes: else a ConfigError naming the fix."""
    for src in (train, test):
        if not src.classes or any(y < 0 for y in src.labels):
            raise ConfigError(f"{src.name} is unlabeled; k-NN and linear evaluation need labels "
                              f"(an image folder with class sub-folders, or a dataset){why_flat(src)}{hint}")
    if test.name == train.name:
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


def _data_record(cfg: Config) -> dict:
    d = cfg.data
    return {"source": d.source, "root": d.root, "data_fraction": d.fraction,
            "data_num_images": d.num_images, "train_fraction": cfg.eval.train_fraction}


# ----------------------------------------------------------------------------------------
# run_eval

@locks_eval_output
def run_eval(kind: str, path: Union[str, Path], overrides: Sequence[str] = (), random_init: bool = False,
             device: Device = "auto", which: Optional[str] = None, train_data: Optional[str] = None,
             test_data: Optional[str] = None, progress: bool = True) -> dict:
    """Evaluate a run folder, a ``backbone.safetensors`` or a checkpoint; write and return JSON.

    Args:
        kind: "knn" (weighted k-NN at k in 10, 20, 100, 200 and eval.k), "linear" (probe on
            cached features), "dense" (label-free dense correspondence on the test split)
            or "seg" (labelled dense probe on mosaics, :mod:`glsd.eval.seg`).
        overrides: ``key=value`` strings on top of the run config (``eval.*`` mostly).
        random_init: evaluate the same architecture with fresh weights (the floor).
        device: "auto" (the config's device, else CUDA if available), "cpu", "cuda", ...
        which: "teacher" or "student"; None uses ``eval.model``.
        train_data, test_data: another labelled set (a folder, a zip, a dataset name; see the
            module docstring); dense reads only ``test_data``.
        progress: progress bars of feature extraction when stderr is a terminal.
    Returns:
        The record also written to ``<run>/eval/<kind>[-student|-random-init][-on-<data>].json`` (by
        rank 0 under torch.distributed; every rank must call it, extraction is shared).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown evaluation {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "dense" and train_data is not None:  # it would be filed under X, computed on the run's data
        raise ConfigError("dense correspondence reads only test images (it is label-free, "
                          f"nothing is trained): give the set as --test-data {train_data}")
    start = time.perf_counter()
    path = Path(path)
    run_overrides = [o for o in overrides if not (o.startswith("data.") and (train_data or test_data))]
    backbone, cfg, info = load_backbone(path, which, random_init, run_overrides)
    dev = eval_device(device, cfg)
    backbone.to(dev)
    base = Path(info["run_dir"])  # the run's subset.json and eval/ (an export's too)
    loaded = time.perf_counter()
    if kind == "dense":
        body, timing = _dense(backbone, cfg, dev, test_data, overrides, progress)
    elif kind == "seg":
        body, timing = _seg(backbone, cfg, dev, base, (train_data, test_data, overrides))
    else:
        body, timing = _classify(kind, backbone, cfg, dev, base, (train_data, test_data, overrides), progress)
    suffix = "" if info["model"] == "teacher" else f"-{info['model']}"
    out = base / "eval" / f"{kind}{suffix}{data_slug(train_data, test_data)}.json"
    record = {"kind": kind, **_model_record(cfg, info), **body,
              "device": str(dev), "world_size": rank_world()[1], "overrides": list(overrides),
              "timing": {"load_s": loaded - start, **timing, "total_s": time.perf_counter() - start},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "output": str(out),
              "config": to_dict(cfg)}
    if rank_world()[0] == 0:
        payload = json.dumps(record, indent=2).encode()
        atomic_write(out, lambda f: f.write(payload))
    return record


def data_slug(train_data: Optional[str], test_data: Optional[str]) -> str:
    """``""`` for the run's data, else ``-on-<names>`` so that sets do not overwrite each other's
    record (``--train-data /d/pets.zip`` -> ``-on-pets.zip``, apart from a folder ``/d/pets``).
    A split folder's name alone says little, so it keeps its parent's: ``/d/a/train`` +
    ``/d/a/test`` -> ``-on-a_train-a_test``, apart from ``/d/b/train`` + ``/d/b/test``."""
    names = []
    for spec in (train_data, test_data):
        if spec is not None:
            path = Path(str(spec).rstrip("/"))
            name = path.name
            if name.lower() in SPLIT_NAMES and path.parent.name:
                name = f"{path.parent.name}_{name}"
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"
            if name not in names:
                names.append(name)
    return f"-on-{'-'.join(names)}" if names else ""


def _model_record(cfg: Config, info: dict) -> dict:
    return {"model": info["model"], "checkpoint": info.get("checkpoint"), "path": info["path"],
            "step": info.get("step"), "epoch": info.get("epoch"), "backbone": cfg.model.backbone,
            "image_size": cfg.eval.image_size or cfg.crops.global_size}


def _classify(kind: str, backbone: Backbone, cfg: Config, dev: torch.device, base: Path,
              other: tuple = (None, None, ()), progress: bool = True) -> tuple[dict, dict]:
    """k-NN or linear probe: (record body, timing); ``other`` = (train_data, test_data, overrides)."""
    train, test, data = eval_sources(cfg, base, *other)
    feature = resolve_feature(backbone, cfg.eval.features)
    t0 = time.perf_counter()
    train_f, train_y = extract_features(backbone, train, cfg, dev, feature,
                                        progress="train features" if progress else None)
    test_f, test_y = extract_features(backbone, test, cfg, dev, feature,
                                      progress="test features" if progress else None)
    t1 = time.perf_counter()
    n_cls = data["num_classes"]
    if kind == "knn":
        ks = tuple(sorted(set(KNN_KS) | {cfg.eval.k}))
        results = knn_classify(train_f, train_y, test_f, test_y, n_cls, ks, cfg.eval.temperature)
        headline = results["per_k"][str(cfg.eval.k)]
        results = {"top1": headline["top1"], "top5": headline["top5"], **results}
        settings = {"k": cfg.eval.k, "k_effective": headline["k_effective"], "ks": list(ks),
                    "temperature": cfg.eval.temperature}
    else:
        results = linear_probe(train_f, train_y, test_f, test_y, n_cls, cfg.eval.linear_epochs,
                               cfg.eval.linear_lr, cfg.eval.batch_size, seed=cfg.train.seed)
        settings = {"linear_epochs": cfg.eval.linear_epochs, "linear_lr": cfg.eval.linear_lr}
    # Extraction may skip unreadable files: report what was actually evaluated.
    data.update(n_train=int(train_y.numel()), n_test=int(test_y.numel()))
    body = {**data, "feature": feature, **settings, "results": results}
    return body, {"features_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def _dense(backbone: Backbone, cfg: Config, dev: torch.device, test_data: Optional[str] = None,
           overrides: Sequence[str] = (), progress: bool = True) -> tuple[dict, dict]:
    """Dense correspondence: (record body, timing)."""
    if test_data is not None:
        cfg = dataclasses.replace(cfg, data=data_config(test_data, cfg.data, overrides))
    test = open_test_split(cfg, cfg.eval.test_split)
    # By name, not by split: a source without split folders gives the same images for both.
    if test_data is None and test.name == open_cached(cfg, cfg.data.split).name:
        warnings.warn(f"dense evaluation on eval.test_split={cfg.eval.test_split!r} reads the "
                      f"pretraining images ({test.name}): they are not held out")
    t0 = time.perf_counter()
    results = run_dense(backbone, test, cfg, dev)
    body = {**_data_record(cfg), "test_data": test_data, "test_source": test.name,
            "test_split": cfg.eval.test_split,
            "n_train": None, "n_test": results["n_images"], "feature": "local",
            "dense_num_images": cfg.eval.dense_num_images, "dense_seed": cfg.eval.dense_seed,
            "results": results}
    return body, {"eval_s": time.perf_counter() - t0}


def _seg(backbone: Backbone, cfg: Config, dev: torch.device, base: Path,
         other: tuple = (None, None, ())) -> tuple[dict, dict]:
    """Labelled dense probe on mosaics of the k-NN / linear images: (record body, timing)."""
    train, test, data = eval_sources(cfg, base, *other)
    t0 = time.perf_counter()
    results = run_seg(backbone, train, test, cfg, dev, data["num_classes"])
    e = cfg.eval
    settings = {"seg_tiles": list(e.seg_tiles), "seg_num_train": e.seg_num_train,
                "seg_num_test": e.seg_num_test, "seg_steps": e.seg_steps, "seg_seed": e.seg_seed}
    return {**data, "feature": "local", **settings, "results": results}, {"eval_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------
# Online k-NN (called by the training loop)

def online_knn(backbone: Backbone, cfg: Config, device: Device,
               train_keys: Union[Sequence[str], str, Path, None]) -> dict:
    """Top-1 k-NN accuracy at ``eval.k``, ``eval.temperature`` during pretraining.

    Args:
        backbone: the backbone to probe (e.g. the teacher's); its train/eval mode is kept.
        train_keys: keys of the train-split source used for pretraining, or the run folder
            (its subset.json is read; without one, the whole train split), or None (the whole
            train split). ``eval.train_fraction`` applies on top.
    Sources are opened once per process and reused. Under torch.distributed every rank must
    call it: extraction is split over ranks and all-gathered, every rank gets the result.

    Returns:
        ``{"top1", "top5", "k" (effective), "temperature", "n_train", "n_test", "seconds"}``.
    """
    start = time.perf_counter()
    if isinstance(train_keys, (str, Path)):
        subset = read_subset(Path(train_keys) / SUBSET_FILE)
        train_keys = subset["keys"] if subset else None
    train, test = _online_sources(cfg, train_keys)
    n_cls = len(train.classes)
    train_f, train_y = extract_features(backbone, train, cfg, device, cfg.eval.features)
    test_f, test_y = extract_features(backbone, test, cfg, device, cfg.eval.features)
    res = knn_classify(train_f, train_y, test_f, test_y, n_cls, (cfg.eval.k,), cfg.eval.temperature)
    top = res["per_k"][str(cfg.eval.k)]
    return {"top1": top["top1"], "top5": top["top5"], "k": top["k_effective"],
            "temperature": cfg.eval.temperature, "n_train": res["n_train"], "n_test": res["n_test"],
            "seconds": time.perf_counter() - start}


def _online_sources(cfg: Config, train_keys: Optional[Sequence[str]]) -> tuple[ImageSource, ImageSource]:
    key = (None if train_keys is None else tuple(train_keys), cfg.data.split, cfg.eval.test_split, cfg.eval.train_fraction,
           cfg.data.subset_seed, json.dumps(dataclasses.asdict(cfg.data), sort_keys=True))
    if _ONLINE.get("key") != key:
        try:
            full = open_cached(cfg, cfg.data.split)
            test = open_test_split(cfg, cfg.eval.test_split)
            check_split_pair(full, test, cfg.data.split, cfg.eval.test_split)
        except ConfigError as e:
            raise ConfigError(f"online k-NN (eval.every_epochs={cfg.eval.every_epochs}): {e}; "
                              "or turn it off with eval.every_epochs=0") from None
        subset = None if train_keys is None else {"keys": list(train_keys), "source": full.name}
        _ONLINE.update(key=key, sources=(train_subset(full, subset, cfg), test))
    return _ONLINE["sources"]


def check_online_knn(cfg: Config) -> None:
    """The labelled, held-out splits online k-NN needs (``eval.every_epochs``): checked before
    the first step, not at the end of the first epoch."""
    if cfg.eval.every_epochs:
        _online_sources(cfg, None)


def headline(record: dict) -> str:
    """One line for the console, e.g. ``k-NN top-1 47.3 % (k=20, 2,500 train / 10,000 test)``."""
    res, n_train, n_test = record["results"], record.get("n_train"), record.get("n_test")
    model = "" if record.get("model") == "teacher" else f" [{record.get('model')}]"
    if record["kind"] == "dense":
        within, chance = res.get("within_one"), res.get("chance_within_one")
        show = (lambda v: "n/a" if v is None else f"{100 * v:.1f} %")
        return (f"dense correspondence within one cell {show(within)} (chance {show(chance)}; "
                f"{n_test:,} test images){model}")
    if record["kind"] == "seg":
        tiles = ", ".join(f"{n}x{n}" for n in record["seg_tiles"])
        return (f"seg cell accuracy {100 * res['accuracy']:.1f} %, mIoU {100 * res['miou']:.1f} % "
                f"(chance {100 * res['chance_accuracy']:.1f} %; {res['n_train_mosaics']:,} train / "
                f"{res['n_test_mosaics']:,} test mosaics of {tiles}){model}")
    counts = f"{n_train:,} train / {n_test:,} test"
    if record["kind"] == "knn":
        k, used = record["k"], record.get("k_effective", record["k"])
        k_text = f"k={used}" if used == k else f"k={used}: eval.k={k} > {n_train:,} train images"
        return f"k-NN top-1 {res['top1']:.1f} % ({k_text}, {counts}){model}"
    return f"linear top-1 {res['top1']:.1f} % ({record['linear_epochs']} epochs, {counts}){model}"
