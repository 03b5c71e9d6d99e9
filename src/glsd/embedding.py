"""``glsd embed``: frozen features of every image of a data source, to a file plus an index.

One row per readable image, in source order: the global feature (the same the k-NN and
linear evaluations use, ``eval.features``) and, with ``local=True``, the pooled local feature
(the mean of the backbone's feature grid). Preprocessing is the evaluation's
(:func:`glsd.eval.features.eval_transform`: resize, center crop to ``eval.image_size`` or the
global crop size, the training normalisation). Unreadable images are skipped and counted
(``data.on_error=fail`` stops at the first instead).

Output, chosen by the suffix of ``out``:

* ``.safetensors``: tensors ``global`` ``(N, D)`` float32, ``labels`` ``(N,)`` int64 (-1 when
  unlabelled) and with ``local=True`` ``local`` ``(N, D)``; metadata records the model, the
  data source, the feature kind and the skip count.
* ``.npy``: the global features ``(N, D)``; with ``local=True`` also ``<stem>.local.npy``.

Beside it, ``<stem>.csv``: ``row,path,label,class`` (``path`` is the source's key: the path
relative to the folder, the zip member, or the dataset index; ``label``/``class`` are empty
when unlabelled).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from glsd.config import ConfigError
from glsd.data.layout import left_out_note
from glsd.data.sources import ImageSource, open_source
from glsd.eval.data_spec import data_config
from glsd.eval.features import iter_features, load_backbone, resolve_feature
from glsd.eval.runner import eval_device
from glsd.run_layout import BACKBONE_FILE, CHECKPOINT_DIR
from glsd.utils.io import atomic_write, check_writable

SUFFIXES = (".safetensors", ".npy")
FILE_MODE = 0o644


@dataclass
class EmbedResult:
    """What :func:`embed` computed (and wrote, when given ``out``)."""
    features: torch.Tensor  # (N, D) float32 global features, on the CPU
    labels: torch.Tensor  # (N,) int64, -1 when unlabelled
    keys: list[str]  # the source key of each row
    classes: list[str]  # class names of the labels ([] when unlabelled)
    local: Optional[torch.Tensor] = None  # (N, D) pooled local features with local=True
    skipped: list[str] = field(default_factory=list)  # keys of unreadable images
    feature: str = ""  # the global feature kind: "cls" or "pooled"
    source: str = ""  # the data source's name
    files: list[Path] = field(default_factory=list)  # written files: features, [local], index


def embed(source: Union[str, Path], data: str, out: Union[str, Path, None] = None, local: bool = False,
          device: str = "auto", batch_size: Optional[int] = None, overrides: Sequence[str] = (),
          which: Optional[str] = None, progress: bool = True) -> EmbedResult:
    """Embed every image of ``data`` with the backbone of ``source``.

    Args:
        source: a run folder, a checkpoint ``.pt`` or a ``backbone.safetensors``.
        data: a folder, a zip or a dataset name (see :mod:`glsd.eval.data_spec`).
        out: ``.safetensors`` or ``.npy`` file to write (with ``<stem>.csv`` beside it);
            None writes nothing.
        local: also the pooled local features.
        device: "auto", "cpu", "cuda", ...; batch_size: images per batch (``eval.batch_size``).
        overrides: ``key=value`` strings: ``data.*`` for the data, ``eval.*`` for the rest.
        which: "teacher" or "student" (None: ``eval.model``).
        progress: a progress bar when stderr is a terminal.
    """
    out = Path(out) if out is not None else None
    if out is not None and out.suffix not in SUFFIXES:
        raise ConfigError(f"--out {out}: use a {' or '.join(SUFFIXES)} file name")
    if out is not None:  # before the features, not after hours of them
        check_writable(out.parent, f"--out {out.name}")
        check_outputs(out, source)
    backbone, cfg, info = load_backbone(source, which, overrides=[o for o in overrides
                                                                   if not o.startswith("data.")])
    cfg.data = data_config(data, cfg.data, overrides)
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size} must be >= 1")
        cfg.eval.batch_size = batch_size
    images = _open_data(data, cfg.data)
    dev = eval_device(device, cfg)
    backbone.to(dev)
    feature = resolve_feature(backbone, cfg.eval.features)
    rows, glob, loc, labels, bad = [], [], [], [], []
    for idx, g, lf, y, skipped in iter_features(backbone, images, cfg, dev, feature, local,
                                                progress="embed" if progress else None):
        bad += skipped
        if g is not None:
            rows += idx
            glob.append(g.cpu())
            labels.append(y.cpu())
            if lf is not None:
                loc.append(lf.cpu())
    dim = backbone.embed_dim
    result = EmbedResult(
        features=_joined(glob, torch.zeros(0, dim)),
        labels=_joined(labels, torch.zeros(0, dtype=torch.long)),
        keys=[images.keys[i] for i in rows], classes=list(images.classes),
        local=_joined(loc, torch.zeros(0, dim)) if local else None,
        skipped=[images.keys[i] for i in bad], feature=feature, source=images.name)
    if out is not None:
        meta = {"format": "glsd-embeddings-v1", "model_path": info["path"], "model": info["model"],
                "step": str(info.get("step")), "backbone": cfg.model.backbone, "feature": feature,
                "image_size": str(cfg.eval.image_size or cfg.crops.global_size),
                "source": images.name, "skipped": str(len(bad)), "classes": json.dumps(images.classes)}
        result.files = write_embeddings(result, out, meta)
    return result


INDEX_HEADER = "row,path,label,class"  # the first line of every index glsd writes


def _joined(parts: list, empty: torch.Tensor) -> torch.Tensor:
    """The batches as one tensor, the list emptied as it is made (not every feature twice)."""
    if not parts:
        return empty
    joined = torch.cat(parts)
    parts.clear()
    return joined


def check_outputs(out: Path, source: Union[str, Path]) -> None:
    """``out`` and its ``<stem>.csv`` replace nothing but an earlier embedding: not the model
    embedded nor its run's, not another model's weights, not a CSV of someone else's (a labels
    file beside the images)."""
    target = out.resolve()
    if any(target == m or m in target.parents for m in model_files(Path(source).resolve())):
        raise ConfigError(f"--out {out} would replace the model being embedded (or its run's "
                          "checkpoints or export); give another file name")
    index = out.with_suffix(".csv")
    header = None
    if index.is_file():
        with open(index, errors="replace") as f:
            header = f.readline().strip()
        if header != INDEX_HEADER:
            raise ConfigError(f"{index} exists and is not a glsd embedding index (its first line is "
                              f"{header[:60]!r}); the index of --out {out.name} would replace it: "
                              "give --out another name")
    if out.exists() and not is_earlier_embedding(out, header == INDEX_HEADER):
        why = (f"an array glsd wrote has its index {index.name} beside it, and there is none"
               if out.suffix != ".safetensors"
               else "its metadata does not say so: another model's weights, or someone else's file")
        raise ConfigError(f"--out {out} exists and is not an embedding glsd wrote ({why}): give "
                          "another file name, or delete it first")


def model_files(src: Path) -> list[Path]:
    """The files and folders of the model being embedded that --out must not touch: a run
    folder's exported backbone, checkpoints and exports; for a file inside a run (a checkpoint,
    the backbone), that run's too."""
    run = src if src.is_dir() else None
    if src.parent.name == CHECKPOINT_DIR:
        run = src.parent.parent
    elif src.name == BACKBONE_FILE:
        run = src.parent
    files = [] if src.is_dir() else [src]
    if run is not None:
        files += [run / BACKBONE_FILE, run / CHECKPOINT_DIR, run / "export"]
    return files


def is_earlier_embedding(path: Path, has_glsd_index: bool) -> bool:
    """A .safetensors glsd embedding says so in its metadata; a .npy carries none, so its
    glsd index beside it (same stem) vouches for it."""
    if path.suffix != ".safetensors":
        return has_glsd_index
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "glsd-embeddings-v1"
    except Exception:  # noqa: BLE001 - unreadable: not an embedding glsd wrote
        return False


def write_embeddings(result: EmbedResult, out: Path, meta: dict) -> list[Path]:
    """Write the features (by suffix) and the CSV index atomically, mode 0644. The index is
    made first: nothing is written unless both can be."""
    # A file name that is not UTF-8 (its bytes held as surrogates) is written as its own bytes,
    # so the CSV names the file on disk.
    index = index_csv(result).encode("utf-8", "surrogateescape")
    files = [out]
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {"global": result.features.contiguous(), "labels": result.labels.contiguous()}
        if result.local is not None:
            tensors["local"] = result.local.contiguous()
        payload = save(tensors, metadata=meta)
        _write(out, lambda f: f.write(payload))
    else:
        import numpy as np

        _write(out, lambda f: np.save(f, result.features.numpy()))
        local = out.with_name(out.stem + ".local.npy")
        if result.local is not None:
            files.append(local)
            _write(local, lambda f: np.save(f, result.local.numpy()))
        elif local.exists():  # an earlier --local run's: its rows are not these
            local.unlink()
    files.append(out.with_suffix(".csv"))
    _write(files[-1], lambda f: f.write(index))
    return files


def index_csv(result: EmbedResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(INDEX_HEADER.split(","))
    for row, (key, y) in enumerate(zip(result.keys, result.labels.tolist())):
        named = y >= 0 and y < len(result.classes)
        writer.writerow([row, key, y if y >= 0 else "", result.classes[y] if named else ""])
    return buf.getvalue()


def _write(path: Path, write) -> None:
    atomic_write(path, write)
    os.chmod(path, FILE_MODE)  # shareable outputs, whatever the umask of the temp file


def _open_data(data: str, data_cfg) -> ImageSource:
    """The images to embed; what they are not (the split asked for, photos left out) is said
    now, not after the features."""
    try:
        images = open_source(data_cfg)
    except ConfigError as e:
        raise ConfigError(f"DATA {data}: {e}") from None
    log = logging.getLogger("glsd")
    split = data_cfg.split
    if images.split is None and split != "train":
        if data_cfg.root and (Path(data_cfg.root).expanduser() / split).is_dir():  # source=folder
            log.warning("DATA %s is read as one folder (data.source=%s): all %d images under it, "
                        "every split folder's; for the %s split alone give DATA %s",
                        data, data_cfg.source, len(images), split, Path(data, split))
        else:
            log.warning("DATA %s has no split folders (no %s/ in it): data.split=%s reads all %d "
                        "of its images", data, split, split, len(images))
    left_out = left_out_note(f"DATA {data}", images.undecodable)
    if left_out:
        log.warning(left_out)
    return images


def summary(result: EmbedResult) -> str:
    """One line for the console."""
    n, d = result.features.shape
    what = f"{d}-dim {result.feature}" + (" + pooled local" if result.local is not None else "")
    line = f"embedded {n:,} images of {result.source} ({what})"
    if result.files:
        line += f" -> {', '.join(str(f) for f in result.files)}"
    if result.skipped:
        first = ", ".join(result.skipped[:3])
        line += f"; skipped {len(result.skipped):,} unreadable ({first}{', ...' if len(result.skipped) > 3 else ''})"
    return line
