"""Comparing configs: the part a checkpoint is bound to, a run's hash, and the keys two
configs differ in (said in refusals: a resume, an evaluation, a study cell of another config)."""
from __future__ import annotations

import hashlib
import json

from glsd.config import Config, same_root, to_dict
from glsd.errors import short


def identity(cfg: Config) -> dict:
    """The part of the config a checkpoint is bound to (model, data, loss, crops, train.seed)."""
    d = to_dict(cfg)
    ident = {k: d[k] for k in Config.IDENTITY_SECTIONS}
    # Workers, error policy, read limits and where views are made do not change what is learned.
    for k in ("num_workers", "on_error", "download", "augment_on", "read_timeout_s", "max_image_pixels"):
        ident["data"].pop(k, None)
    ident["data"]["root"] = same_root(ident["data"]["root"])
    ident["model"].pop("channels_last", None)  # a memory layout, same numbers
    # The seed drew the initial weights and draws every view: another seed is another run.
    ident["train"] = {"seed": d["train"]["seed"]}
    return ident


def config_hash(cfg: Config) -> str:
    payload = json.dumps({**identity(cfg), "train": to_dict(cfg)["train"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}: {short(va)} -> {short(vb)}")
    return keys

