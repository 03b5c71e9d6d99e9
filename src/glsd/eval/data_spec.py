"""A data source named on the command line (``glsd embed RUN DATA``, ``--train-data X``).

``DATA`` is a dataset name (``cifar10``, ``cifar100``, ``stl10``, ``fashion_mnist``,
``synthetic``, ``sample``) or a path (an ImageFolder, a flat folder, a zip), read exactly as pretraining
reads ``data.root``. It replaces the run's ``data`` section: only ``data.num_workers``,
``data.jpeg_draft``, ``data.read_timeout_s`` and ``data.max_image_pixels`` are kept from the run, unreadable images are skipped (``data.on_error=skip``),
and ``data.*`` overrides apply on top (for example
``data.split=test``, ``data.source=folder``, ``data.root=DIR`` for a dataset's download folder).
A dataset name wins over a folder of the same name in the working directory: write ``./cifar10``.
"""
from __future__ import annotations

from typing import Sequence

from glsd.config import ConfigError, DataConfig, apply_overrides
from glsd.data.sources import TORCHVISION_SOURCES

DATASET_NAMES = (*TORCHVISION_SOURCES, "synthetic", "sample")
SUBSET_KEYS = ("data.fraction", "data.num_images", "data.subset_seed")


def data_config(spec: str, base: DataConfig, overrides: Sequence[str] = ()) -> DataConfig:
    """The ``DataConfig`` that reads ``spec`` (a dataset name or a path), with ``data.*`` of
    ``overrides`` applied; other override keys are ignored here."""
    spec = str(spec)
    if not spec:
        raise ConfigError("empty data source: give a folder, a .zip or one of "
                          f"{', '.join(DATASET_NAMES)}")
    raw = {"num_workers": base.num_workers, "jpeg_draft": base.jpeg_draft,
           "read_timeout_s": base.read_timeout_s, "max_image_pixels": base.max_image_pixels,
           "on_error": "skip"}
    raw.update({"source": spec} if spec in DATASET_NAMES else {"source": "auto", "root": spec})
    data_overrides = [o for o in overrides if o.split("=", 1)[0].startswith("data.")]
    subset = [o.split("=", 1)[0] for o in data_overrides if o.split("=", 1)[0].strip() in SUBSET_KEYS]
    if subset:  # they choose pretraining images; a named set is read whole
        raise ConfigError(f"{', '.join(subset)} choose the images a run pretrains on; a set named "
                          f"on the command line ({spec}) is read whole (for k-NN / linear on part of "
                          "its train images: eval.train_fraction)")
    return apply_overrides({"data": raw}, data_overrides).data
