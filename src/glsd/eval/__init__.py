"""Evaluation of pretrained backbones: k-NN, linear probe, dense correspondence and the
labelled dense probe (seg), run by :func:`glsd.eval.runner.run_eval`.

The names below load on first use, so importing one evaluation module (``glsd.eval.knn``)
does not import every other one with its dependencies.
"""
from __future__ import annotations

import importlib

_HOMES = {"KINDS": "runner", "online_knn": "online", "run_eval": "runner",
          "dense_correspondence": "dense", "run_dense": "dense",
          "eval_transform": "features", "extract_features": "features", "load_backbone": "features",
          "knn_classify": "knn", "linear_probe": "linear"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'glsd.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"glsd.eval.{_HOMES[name]}"), name)
