"""Online k-NN: the k-NN accuracy the training loop logs every ``eval.every_epochs``, on the
images ``glsd eval knn`` scores (the same sources, opened once per process and reused)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from glsd.config import Config, ConfigError
from glsd.data.sources import ImageSource
from glsd.data.subset import SUBSET_FILE, read_subset
from glsd.eval.eval_data import held_out_pair, open_cached, open_test_split, remember_source
from glsd.eval.features import Device, extract_features
from glsd.eval.knn import knn_classify
from glsd.models.backbone import Backbone

_ONLINE: dict = {}


def clear_online_cache() -> None:
    _ONLINE.clear()


def online_knn(backbone: Backbone, cfg: Config, device: Device,
               train_keys: Union[Sequence[str], str, Path, None]) -> dict:
    """Top-1 k-NN accuracy at ``eval.k``, ``eval.temperature`` during pretraining.

    Args:
        backbone: the backbone to probe (e.g. the teacher's); its train/eval mode is kept.
        train_keys: keys of the train-split source used for pretraining, or the run folder
            (its subset.json is read; without one, the whole train split), or None (the whole
            train split). ``eval.train_fraction`` applies on top.
    Sources are opened once per process and reused. Under torch.distributed every rank must
    call it: extraction is split over ranks, the bank stays sharded, every rank gets the result.

    Returns:
        ``{"top1", "top5", "k" (effective), "temperature", "n_train", "n_test", "seconds"}``.
    """
    start = time.perf_counter()
    if isinstance(train_keys, (str, Path)):
        subset = read_subset(Path(train_keys) / SUBSET_FILE)
        train_keys = subset["keys"] if subset else None
    train, test = _online_sources(cfg, train_keys)
    n_cls = len(train.classes)
    # The bank stays sharded over the ranks: gathering it would hold all of it on every rank.
    train_f, train_y = extract_features(backbone, train, cfg, device, cfg.eval.features, gather=False)
    test_f, test_y = extract_features(backbone, test, cfg, device, cfg.eval.features)
    res = knn_classify(train_f, train_y, test_f, test_y, n_cls, (cfg.eval.k,), cfg.eval.temperature,
                       sharded=True)
    top = res["per_k"][str(cfg.eval.k)]
    return {"top1": top["top1"], "top5": top["top5"], "k": top["k_effective"],
            "temperature": cfg.eval.temperature, "n_train": res["n_train"], "n_test": res["n_test"],
            "seconds": time.perf_counter() - start}


def _online_sources(cfg: Config, train_keys: Optional[Sequence[str]]) -> tuple[ImageSource, ImageSource]:
    key = (None if train_keys is None else tuple(train_keys), cfg.data.split, cfg.eval.test_split, cfg.eval.train_fraction,
           cfg.eval.max_test_images, cfg.data.subset_seed, json.dumps(dataclasses.asdict(cfg.data), sort_keys=True))
    if _ONLINE.get("key") != key:
        try:
            full = open_cached(cfg, cfg.data.split)
            test = open_test_split(cfg, cfg.eval.test_split)
            subset = None if train_keys is None else {"keys": list(train_keys), "source": full.name}
            sources = held_out_pair(full, test, subset, cfg, cfg.data.split)
        except ConfigError as e:
            raise ConfigError(f"online k-NN (eval.every_epochs={cfg.eval.every_epochs}): {e}; "
                              "or turn it off with eval.every_epochs=0") from None
        _ONLINE.update(key=key, sources=sources)
    return _ONLINE["sources"]


def check_online_knn(cfg: Config, train_source: Optional[ImageSource] = None) -> None:
    """The labelled, held-out splits online k-NN needs (``eval.every_epochs``): checked before
    the first step, not at the end of the first epoch. ``train_source``: the pretraining
    images as the run opened them (``open_source(cfg.data)``), reused rather than listed again."""
    if cfg.eval.every_epochs:
        if train_source is not None:
            remember_source(cfg.data, train_source)
            clear_online_cache()  # sources made from an older listing
        _online_sources(cfg, None)
