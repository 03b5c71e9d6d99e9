"""Evaluation entry point: ``run_eval`` (k-NN, linear probe, dense, seg); online k-NN is in
:mod:`glsd.eval.online`.

Evaluation data follow the run: the labelled train split restricted to exactly the images of
``RUN_DIR/subset.json`` (the pretraining images; the whole train split when there is no such
file), optionally cut to a class-balanced ``eval.train_fraction`` of them, and the full
``eval.test_split`` (or a class-balanced ``eval.max_test_images`` of it). Data come from the run
config's ``data`` section with the split replaced. Another labelled set replaces them with
``train_data`` / ``test_data`` (a folder, a zip or a dataset name, read as ``glsd embed``
reads DATA): the train split of ``train_data`` (``data.split``), all of it, since the
pretraining subset belongs to other data, and the ``eval.test_split`` of ``test_data``
(default: ``train_data``).
Results are written to ``RUN_DIR/eval/<kind>[-student|-random-init][-epochNNNN][-on-<data>][-<setting>].json``
(``-epochNNNN`` for an earlier checkpoint, ``-<setting>`` for a command-line setting; for a
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

from glsd.config import EVALUATIONS, Config, ConfigError, same_root, to_dict
from glsd.errors import GlsdError
from glsd.data.layout import is_split_name
from glsd.data.sources import ImageSource
from glsd.eval.data_spec import data_config
from glsd.eval.eval_data import SOURCES, data_record, eval_sources, open_cached, open_test_split
from glsd.eval.dense import run_dense
from glsd.eval.features import Device, extract_features, load_backbone, resolve_feature
from glsd.eval.knn import knn_classify
from glsd.eval.online import clear_online_cache
from glsd.eval.locate import snapshot_name
from glsd.eval.linear import linear_probe
from glsd.eval.seg import run_seg
from glsd.models.backbone import Backbone
from glsd.utils.distributed import rank_world
from glsd.train.lock import locks_eval_output
from glsd.utils.device import resolve_device as _resolve_device
from glsd.utils.io import atomic_write

KINDS = EVALUATIONS
KNN_KS = (10, 20, 100, 200)


def clear_cache() -> None:
    SOURCES.clear()
    clear_online_cache()


def eval_device(device: Device, cfg: Config) -> torch.device:
    """The device argument; "auto" takes the run's own ``device`` where this machine has one of
    its kind (a run trained on a GPU box is evaluated on a laptop's CPU), else
    :func:`glsd.utils.device.resolve_device`'s choice."""
    if str(device) != "auto":
        return _resolve_device(device)
    try:
        return _resolve_device(cfg.device)
    except ConfigError:  # this machine has none of its kind (resolve_device's own check)
        return _resolve_device("auto")


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
        The record also written to ``<run>/eval/<kind>[-student|-random-init][-epochNNNN][-on-<data>][-<setting>].json`` (by
        rank 0 under torch.distributed; every rank must call it, extraction is shared).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown evaluation {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "dense" and train_data is not None:  # it would be filed under X, computed on the run's data
        raise ConfigError("dense correspondence reads only test images (it is label-free, "
                          f"nothing is trained): give the set as --test-data {train_data}")
    if kind == "dense" and any(o.startswith("eval.image_size=") for o in overrides):
        # it would be filed and recorded under a size it never used
        raise ConfigError("dense correspondence compares two crops of crops.global_size px (the "
                          "views' size in training); eval.image_size does not apply to it: give "
                          "crops.global_size=S instead")
    start = time.perf_counter()
    path = Path(path)
    run_overrides = [o for o in overrides if not (o.startswith("data.") and (train_data or test_data))]
    backbone, cfg, info = load_backbone(path, which, random_init, run_overrides)
    cfg = with_named_set_reading(cfg, train_data or test_data, overrides)
    if (test_data if kind == "dense" else train_data) is None:  # the run's own images are read
        check_run_data(cfg, path, other_test_set=test_data is not None)
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
    snapshot = snapshot_name(info.get("checkpoint"))  # an earlier checkpoint: not the final model's record
    out = base / "eval" / record_name(kind, info["model"], snapshot, train_data, test_data, overrides)
    record = {"kind": kind, **_model_record(cfg, info), **body,
              "device": str(dev), "world_size": rank_world()[1], "overrides": list(overrides),
              "timing": {"load_s": loaded - start, **timing, "total_s": time.perf_counter() - start},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "output": str(out),
              "config": to_dict(cfg)}
    if rank_world()[0] == 0:
        payload = json.dumps(record, indent=2).encode()
        atomic_write(out, lambda f: f.write(payload))
    return record


def record_name(kind: str, model: str, snapshot: str, train_data: Optional[str],
                test_data: Optional[str], overrides: Sequence[str]) -> str:
    """``<kind>[-student|-random-init][-epochNNNN][-on-<data>][-<setting>].json``."""
    suffix = ("" if model == "teacher" else f"-{model}") + (f"-{snapshot}" if snapshot else "")
    return f"{kind}{suffix}{data_slug(train_data, test_data, kind != 'dense')}{settings_slug(overrides)}.json"


def check_run_data(cfg: Config, path: Path, other_test_set: bool = False) -> None:
    """The run's images, where its config says they are: moved, the fix is one override (the
    plain "data.root does not exist" names a key the user never typed). With --test-data the
    data.* keys are that set's, so the override cannot move the run's images there."""
    root = cfg.data.root
    if not (root and cfg.data.source in ("auto", "zip", "imagefolder", "folder")
            and not Path(root).expanduser().exists()):
        return
    fix = ("give data.root=NEW_PLACE without --test-data, or --train-data NEW_PLACE (all of its "
           "images, not the run's subset.json)" if other_test_set else "add data.root=NEW_PLACE to "
           "the command")
    raise ConfigError(f"the images of {path} were at data.root={root} (its config), which does not "
                      f"exist: if they moved, {fix}")


# How images are read, not which: a named set's values serve every extraction of its evaluation.
READING_KEYS = ("on_error", "jpeg_draft", "num_workers", "read_timeout_s")


def with_named_set_reading(cfg: Config, spec: Optional[str], overrides: Sequence[str]) -> Config:
    """``cfg`` whose reading policy is that of the set named on the command line (its
    ``data.*`` overrides applied), when one is: the run's own ``data`` section would otherwise
    decide how another set's files are decoded and whether a bad one stops the evaluation."""
    if spec is None:
        return cfg
    named = data_config(spec, cfg.data, overrides)
    reading = {k: getattr(named, k) for k in READING_KEYS}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **reading))


# Overrides that change how an evaluation runs, not what it measures: left out of its file name.
HOW_NOT_WHAT = {"eval.batch_size", "eval.every_epochs", "eval.model", "data.num_workers",
                "data.read_timeout_s", "device"}


def settings_slug(overrides: Sequence[str]) -> str:
    """``-<key><value>`` per override that changes what is measured (``eval.train_fraction=0.1``
    -> ``-train_fraction0.1``), so that records of other settings do not replace each other's."""
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.strip()
        if key not in HOW_NOT_WHAT:
            parts.append(_file_name_part(key.split(".", 1)[-1] + value.strip()))
    return "".join(f"-{part}" for part in parts)


def _file_name_part(text: str) -> str:
    """``text`` safe in a record's file name (runs of other characters become one ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def data_slug(train_data: Optional[str], test_data: Optional[str], labelled_train: bool = True) -> str:
    """``""`` for the run's data, else ``-on-<names>`` so that sets do not overwrite each other's
    record (``--train-data /d/pets.zip`` -> ``-on-pets.zip``, apart from a folder ``/d/pets``).
    A split folder's name alone says little, so it keeps its parent's: ``/d/a/train`` +
    ``/d/a/test`` -> ``-on-a_train-a_test``, apart from ``/d/b/train`` + ``/d/b/test``.
    Test images alone, where the evaluation has a labelled train set (``labelled_train``: the
    run's own images then), are ``-on-run-Y``, apart from ``--train-data Y`` (Y for both)."""
    names = ["run"] if labelled_train and train_data is None and test_data is not None else []
    for spec in (train_data, test_data):
        if spec is not None:
            path = Path(str(spec).rstrip("/"))
            name = path.name
            if is_split_name(name) and path.parent.name:
                name = f"{path.parent.name}_{name}"
            name = _file_name_part(name) or "data"
            if name not in names:
                names.append(name)
    return f"-on-{'-'.join(names)}" if names else ""


def _model_record(cfg: Config, info: dict) -> dict:
    step, planned = info.get("step"), info.get("planned_steps")
    return {"model": info["model"], "checkpoint": info.get("checkpoint"), "path": info["path"],
            "step": step, "epoch": info.get("epoch"), "planned_steps": planned,
            # a checkpoint of a run still training, or stopped early: not the final model
            "run_finished": None if step is None or planned is None else step >= planned,
            "backbone": cfg.model.backbone, "image_size": cfg.eval.image_size or cfg.crops.global_size}


def _classify(kind: str, backbone: Backbone, cfg: Config, dev: torch.device, base: Path,
              other: tuple = (None, None, ()), progress: bool = True) -> tuple[dict, dict]:
    """k-NN or linear probe: (record body, timing); ``other`` = (train_data, test_data, overrides)."""
    train, test, data = eval_sources(cfg, base, *other)
    feature = resolve_feature(backbone, cfg.eval.features)
    t0 = time.perf_counter()
    # A k-NN bank stays sharded over the ranks (knn_classify merges their neighbours).
    train_f, train_y = extract_features(backbone, train, cfg, dev, feature, gather=kind != "knn",
                                        progress="train features" if progress else None)
    test_f, test_y = extract_features(backbone, test, cfg, dev, feature,
                                      progress="test features" if progress else None)
    t1 = time.perf_counter()
    n_cls = data["num_classes"]
    if kind == "knn":
        ks = tuple(sorted(set(KNN_KS) | {cfg.eval.k}))
        results = knn_classify(train_f, train_y, test_f, test_y, n_cls, ks, cfg.eval.temperature,
                               sharded=True)
        headline = results["per_k"][str(cfg.eval.k)]
        results = {"top1": headline["top1"], "top5": headline["top5"], **results}
        settings = {"k": cfg.eval.k, "k_effective": headline["k_effective"], "ks": list(ks),
                    "temperature": cfg.eval.temperature}
    else:
        results = linear_probe(train_f, train_y, test_f, test_y, n_cls, cfg.eval.linear_epochs,
                               cfg.eval.linear_lr, cfg.eval.linear_batch_size, seed=cfg.train.seed)
        settings = {"linear_epochs": cfg.eval.linear_epochs, "linear_lr": cfg.eval.linear_lr,
                    "linear_batch_size": cfg.eval.linear_batch_size}
    # Extraction may skip unreadable files: report what was actually evaluated.
    n_train = results["n_train"] if kind == "knn" else int(train_y.numel())
    data.update(n_train=n_train, n_test=int(test_y.numel()))
    body = {**data, "feature": feature, **settings, "results": results}
    return body, {"features_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def _dense(backbone: Backbone, cfg: Config, dev: torch.device, test_data: Optional[str] = None,
           overrides: Sequence[str] = (), progress: bool = True) -> tuple[dict, dict]:
    """Dense correspondence: (record body, timing)."""
    run_cfg = cfg
    if test_data is not None:
        cfg = dataclasses.replace(cfg, data=data_config(test_data, cfg.data, overrides))
    test = open_test_split(cfg, cfg.eval.test_split)
    if test.identity == _pretraining_identity(run_cfg, test):
        missing = " (no such split there: the whole folder)" if run_cfg.data.split != cfg.eval.test_split else ""
        where = f"--test-data {test_data}" if test_data else f"eval.test_split={cfg.eval.test_split!r}{missing}"
        warnings.warn(f"dense evaluation on {where} reads the pretraining images ({test.name}): "
                      "they are not held out; --test-data names held-out images")
    t0 = time.perf_counter()
    results = run_dense(backbone, test, cfg, dev)
    body = {**data_record(cfg), "test_data": test_data, "test_source": test.name,
            "test_split": cfg.eval.test_split,
            "n_train": None, "n_test": results["n_images"], "feature": "local",
            "dense_num_images": cfg.eval.dense_num_images, "dense_seed": cfg.eval.dense_seed,
            "results": results}
    return body, {"eval_s": time.perf_counter() - t0}


def _pretraining_identity(cfg: Config, test: ImageSource) -> Optional[str]:
    """Where the run's pretraining images are (by place, not by split: a source without split
    folders gives the same images for both), when they may be ``test``'s; None when they
    cannot be opened here (evaluating on another set is how a run whose data stayed elsewhere
    is scored). Never downloads, and lists the run's folder only when ``test`` lies in it."""
    root = same_root(cfg.data.root)
    if test.location and not (root and test.location.startswith(root)):
        return None  # files elsewhere: not the pretraining images, whatever they hold
    try:
        return open_cached(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, download=False)),
                           cfg.data.split).identity
    except (GlsdError, OSError):
        return None


def _seg(backbone: Backbone, cfg: Config, dev: torch.device, base: Path,
         other: tuple = (None, None, ())) -> tuple[dict, dict]:
    """Labelled dense probe on mosaics of the k-NN / linear images: (record body, timing)."""
    train, test, data = eval_sources(cfg, base, *other, purpose="the labelled dense probe (seg)")
    t0 = time.perf_counter()
    results = run_seg(backbone, train, test, cfg, dev, data["num_classes"])
    e = cfg.eval
    settings = {"seg_tiles": list(e.seg_tiles), "seg_num_train": e.seg_num_train,
                "seg_num_test": e.seg_num_test, "seg_steps": e.seg_steps, "seg_seed": e.seg_seed}
    return {**data, "feature": "local", **settings, "results": results}, {"eval_s": time.perf_counter() - t0}


def headline(record: dict) -> str:
    """One line for the console, e.g. ``k-NN top-1 47.3 % (k=20, 2,500 train / 10,000 test)``,
    with the random-init floor of the same evaluation when it was measured (``--random-init``):
    on little data the floor, not chance, says whether training helped."""
    return _headline(record) + _floor_note(record)


def _floor_note(record: dict) -> str:
    if record.get("model") != "teacher" or not record.get("output"):
        return ""
    # the same evaluation of random weights, which come from no checkpoint (no snapshot)
    name = record_name(record["kind"], "random-init", "", record.get("train_data"),
                       record.get("test_data"), record.get("overrides") or ())
    try:
        floor = json.loads(Path(record["output"]).with_name(name).read_text())
        value = _main_value(floor)
    except (OSError, ValueError, KeyError, TypeError):  # not measured, or another version's record
        return ""
    return f"; random-init floor {value:.1f} %"


def _main_value(record: dict) -> float:
    """The headline number of a record, in %."""
    res = record["results"]
    if record["kind"] == "dense":
        return 100 * res["within_one"]
    if record["kind"] == "seg":
        return 100 * res["accuracy"]
    return res["top1"]


def _headline(record: dict) -> str:
    res, n_train, n_test = record["results"], record.get("n_train"), record.get("n_test")
    model = "" if record.get("model") == "teacher" else f" [{record.get('model')}]"
    if record.get("run_finished") is False:
        model += f" [step {record['step']:,} of {record['planned_steps']:,}: not the run's final model]"
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
