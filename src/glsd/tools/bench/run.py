"""``glsd bench``: run the chosen sections and assemble one JSON object."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch

from glsd.config import Config, ConfigError, apply_overrides, load_config, to_dict
from glsd.tools.bench.common import environment, finite, load_avg, log

SCHEMA = "glsd-bench/1"
SECTIONS = ("geometry", "step", "data", "utilisation", "knn")
IMAGE_SECTIONS = ("step", "data", "utilisation")  # these run the preset's images through a step
DEFAULT_PRESET = "cpu-default"
# Sources that need data.root (a folder or zip); the others (synthetic, sample, the torchvision
# datasets) bring their images with them.
ROOTED_SOURCES = ("auto", "imagefolder", "folder", "zip")

TARGETS = {  # name: (comparison, threshold)
    "geometry.min_speedup": (">=", 50.0),
    "geometry.max_disagreement_cells": ("<", 0.01),
    "data.ratio_pipeline_over_step": (">=", 2.0),
    "step.ratio_geometric_over_none": ("<=", 1.25),
    "step.match_share_geometric": ("<=", 0.03),
}


def check_targets(result: dict) -> list[dict]:
    rows = []
    for key, (op, threshold) in TARGETS.items():
        section, name = key.split(".", 1)
        value = result.get(section, {}).get(name)
        if value is None:
            continue
        met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[op]
        rows.append({"name": key, "value": value, "target": f"{op} {threshold}", "met": bool(met)})
    return rows


def run_bench(preset: Optional[str] = DEFAULT_PRESET, overrides: Sequence[str] = (), quick: bool = False,
              sections: Optional[Sequence[str]] = None, compile_model: bool = False,
              threads: Optional[int] = None, data: Optional[str] = None) -> dict:
    """Run the chosen sections (default: all) and return one JSON-able dict.

    ``data``: a folder or zip of real images (``--data``); the data section measures decoding
    them, and a preset that names no images of its own (no ``data.root``) trains on them.
    """
    sections = list(sections or SECTIONS)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ConfigError(f"unknown bench section(s) {bad}; choose from {', '.join(SECTIONS)}")
    cfg = bench_config(preset, overrides, quick, sections, data)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_bench(cfg, preset, overrides, quick, sections, compile_model, data)
    finally:
        torch.set_num_threads(threads_before)


def bench_config(preset: Optional[str], overrides: Sequence[str], quick: bool, sections: Sequence[str],
                 data: Optional[str]) -> Config:
    """The preset with the bench's settings; refuses up front when a chosen section needs
    images the preset does not name and ``--data`` is missing."""
    cfg = load_config(preset, list(overrides))
    if cfg.data.source in ROOTED_SOURCES and not cfg.data.root:
        needing = [s for s in sections if s in IMAGE_SECTIONS]
        if needing and data is None:
            raise ConfigError(f"bench section(s) {', '.join(needing)} need images and {preset or 'the config'} "
                              "has no data.root: pass --data PATH (a folder or zip of images), or "
                              f"run only --sections {','.join(s for s in sections if s not in IMAGE_SECTIONS) or 'geometry,knn'}")
        if data is not None:
            cfg = apply_overrides(cfg, [f"data.root={data}"])
    if quick:  # smoke mode: small batch, few images; the rest of the preset as it is
        cfg = apply_overrides(cfg, ["train.batch_size=8", "data.synthetic_num_images=64"])
    return apply_overrides(cfg, ["train.progress=false"])


def _run_bench(cfg: Config, preset, overrides, quick, sections, compile_model, data) -> dict:
    from glsd.tools.bench.harness import first_batch
    from glsd.utils.device import resolve_device

    start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "schema": SCHEMA, "preset": preset, "overrides": list(overrides), "data_path": data, "quick": quick,
        "sections": sections, "env": environment(device),
        "config": {k: to_dict(cfg)[k] for k in ("data", "crops", "model", "loss")} | {
            "batch_size": cfg.train.batch_size, "precision": cfg.train.precision},
    }
    batch = first_batch(cfg) if any(s in sections for s in IMAGE_SECTIONS) else None
    timings = {}
    for name in SECTIONS:  # fixed order: step before data (data's ratio uses the step)
        if name not in sections:
            continue
        t = time.perf_counter()
        log(f"section {name} ...")
        result[name] = run_section(name, cfg, device, quick, batch, compile_model, data, result)
        timings[name] = round(time.perf_counter() - t, 2)
        log(f"section {name}: {timings[name]} s")
    result["env"]["load_avg_end"] = load_avg()
    result["targets"] = check_targets(result)
    result["section_seconds"] = timings
    result["elapsed_s"] = round(time.perf_counter() - start, 2)
    return finite(result)


def run_section(name: str, cfg: Config, device: torch.device, quick: bool, batch, compile_model: bool,
                data: Optional[str], result: dict) -> dict:
    if name == "geometry":
        from glsd.models.backbone import build_backbone
        from glsd.tools.bench.geometry import bench_geometry

        probe = build_backbone(cfg.model, cfg.crops.global_size)
        grids = {s: probe.grid_size((s, s)) for s in (cfg.crops.global_size, cfg.crops.local_size)}
        return bench_geometry(cfg, quick, grids)
    if name == "step":
        from glsd.tools.bench.step import bench_step

        return bench_step(cfg, device, quick, batch)
    if name == "data":
        from glsd.tools.bench.data import bench_data
        from glsd.tools.bench.harness import build_harness, run_interleaved

        step_ips = result.get("step", {}).get("modes", {}).get(cfg.loss.matching, {}).get("images_per_s")
        if step_ips is None:  # the step section was not run: a short measurement here
            h = build_harness(cfg.loss.matching, cfg, device, batch)
            run_interleaved([h], 1, 2 if quick else 4)
            step_ips = h.summary()["images_per_s"]
        return bench_data(cfg, device, quick, step_ips, data)
    if name == "utilisation":
        from glsd.tools.bench.step import bench_utilisation

        return bench_utilisation(cfg, device, quick, batch, compile_model)
    from glsd.tools.bench.knn import bench_knn

    return bench_knn(device, quick)
