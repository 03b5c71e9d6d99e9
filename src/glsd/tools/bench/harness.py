"""``glsd bench``: where the time of a step goes, every comparison measured side by side.

Sections (each a function returning a JSON-able dict; :func:`run_bench` runs the chosen ones
and prints one JSON object):

- ``geometry``: analytic cell centres (:func:`glsd.data.geometry.cell_centers`, vectorised
  over a batch of crops) against a position-map baseline (a ``2 x H x W`` map of pixel
  coordinates cut with the same crop by ``torchvision resized_crop`` + flip, then
  average-pooled to the grid), per crop, for 32 x 32 and 500 x 375 sources.
- ``data``: images/s of the view pipeline (:mod:`glsd.data.views`) against the training
  step, in both places it runs: in the loader workers (``augment_on=cpu``, reported as
  ``cpu_batched``) and on the device (loader that decodes to uint8, plus the batched views).
- ``step``: images/s of the real training step (:func:`glsd.train.pretrain.train_step`) for
  matching none / similarity / geometric and a few local-head sizes, interleaved step by
  step; the share of :meth:`GlobalLocalObjective.match` in the step.
- ``utilisation``: FLOPs of one step (``FlopCounterMode``) over the measured step time,
  against the matmul peak measured in the same run; levers side by side (fp32 / bf16
  autocast, channels_last, fused AdamW, torch.compile behind ``--compile``); allocator.
- ``knn``: throughput and peak memory of :func:`glsd.eval.knn.knn_classify`.

Timings are medians after warm-up; ratios come from timings taken in the same loop, so a
loaded machine slows both sides alike (but still adds noise: read ``env.load_avg``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from glsd.config import Config, ConfigError, load_config, to_dict

SCHEMA = "glsd-bench/1"
SECTIONS = ("geometry", "step", "data", "utilisation", "knn")
DEFAULT_PRESET = "cpu-default"
# The CIFAR-10 zip of the low-data presets, if present (the data section measures it too).
ZIP_CANDIDATES = ("../shared/data/cifar10-jpg.zip",)

TARGETS = {  # name: (comparison, threshold)
    "geometry.min_speedup": (">=", 50.0),
    "geometry.max_disagreement_cells": ("<", 0.01),
    "data.ratio_pipeline_over_step": (">=", 2.0),
    "step.ratio_geometric_over_none": ("<=", 1.25),
    "step.match_share_geometric": ("<=", 0.03),
}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _time_calls(fn: Callable[[], Any], reps: int, warmup: int = 1,
                device: torch.device = torch.device("cpu")) -> list[float]:
    """Seconds per call, ``reps`` times after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b and math.isfinite(a) and math.isfinite(b) else float("nan")


# ----------------------------------------------------------------------------------------
# Environment


def allocator_info() -> dict:
    """Which malloc this process uses: LD_PRELOAD and the libraries mapped into it."""
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    tcmalloc = "tcmalloc" in maps or "tcmalloc" in preload
    jemalloc = "jemalloc" in maps or "jemalloc" in preload
    return {
        "ld_preload": preload,
        "tcmalloc_loaded": tcmalloc,
        "jemalloc_loaded": jemalloc,
        "allocator": "tcmalloc" if tcmalloc else "jemalloc" if jemalloc else "glibc malloc",
        "malloc_conf": os.environ.get("MALLOC_CONF", ""),
        # Installed (whether preloaded or not); the bench installs nothing.
        "tcmalloc_available": _library_files("libtcmalloc"),
        "jemalloc_available": _library_files("libjemalloc"),
    }


def _library_files(stem: str) -> list[str]:
    found: list[str] = []
    for d in ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib"):
        found += glob.glob(f"{d}/{stem}*.so*") + glob.glob(f"{d}/*/{stem}*.so*")
    return sorted(set(found))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment(device: torch.device) -> dict:
    import timm
    import torchvision

    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__,
        "device": str(device), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_avg": _load_avg(),
        "allocator": allocator_info(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = env["cpu_model"]
    return env


# ----------------------------------------------------------------------------------------
# 1. Geometry


def position_map(height: int, width: int) -> torch.Tensor:
    """``(2, H, W)`` pixel-centre coordinates (y, x) of an image: the baseline's map."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                            torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    return torch.stack([yy, xx])


def position_map_centers(pos: torch.Tensor, crop: tuple[int, int, int, int], flipped: bool,
                         size: int, grid: tuple[int, int], interpolation) -> torch.Tensor:
    """The baseline: warp the map with the crop (resized_crop + flip), average-pool it to
    the grid -> ``(gh * gw, 2)`` centres (y, x), row-major like :func:`cell_centers`."""
    from torchvision.transforms import functional as TF

    top, left, h, w = crop
    view = TF.resized_crop(pos, top, left, h, w, [size, size], interpolation, antialias=True)
    if flipped:
        view = TF.hflip(view)
    return F.adaptive_avg_pool2d(view, grid).flatten(1).T


def bench_geometry(cfg: Config, quick: bool, model_grids: dict[int, tuple[int, int]]) -> dict:
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from glsd.data.geometry import cell_centers

    c = cfg.crops
    interp = InterpolationMode.BICUBIC if c.interpolation == "bicubic" else InterpolationMode.BILINEAR
    n_crops = 32 if quick else 512
    n_base = 8 if quick else 96
    reps = 3 if quick else 7
    # (name, (H, W), [(size, grid, scale)]): the preset's crops on 32 px images; the paper's
    # 224 / 96 crops with Swin-T's 7x7 / 3x3 grids on a 500 x 375 image.
    cases = [
        ("32x32", (32, 32), [(c.global_size, model_grids[c.global_size], c.global_scale),
                             (c.local_size, model_grids[c.local_size], c.local_scale)]),
        ("500x375", (375, 500), [(224, (7, 7), (0.4, 1.0)), (96, (3, 3), (0.05, 0.4))]),
    ]
    rng = random.Random(0)
    results = []
    for name, (height, width), kinds in cases:
        dummy = torch.empty(1, height, width)
        pos = position_map(height, width)
        per_kind = []
        for size, grid, scale in kinds:
            crops, flips = [], []
            torch.manual_seed(rng.randrange(2 ** 31))
            for _ in range(n_crops):
                crops.append(T.RandomResizedCrop.get_params(dummy, list(scale), list(c.ratio)))
                flips.append(rng.random() < 0.5)
            geom = torch.tensor([[*b, float(f)] for b, f in zip(crops, flips)], dtype=torch.float32)
            analytic_s = _median(_time_calls(lambda: cell_centers(geom, grid), reps, warmup=2))
            base = [None] * n_base

            def baseline():
                for i in range(n_base):
                    base[i] = position_map_centers(pos, crops[i], flips[i], size, grid, interp)

            base_s = _median(_time_calls(baseline, reps, warmup=1))
            analytic = cell_centers(geom[:n_base], grid)  # (n, N, 2)
            baseline_c = torch.stack(base)
            cell = torch.stack([geom[:n_base, 2] / grid[0], geom[:n_base, 3] / grid[1]], -1)[:, None]
            disagreement = ((analytic - baseline_c).abs() / cell).amax(-1)  # (n, N) in cells
            per_kind.append({
                "crop_size": size, "grid": list(grid), "scale": list(scale),
                "n_crops_analytic": n_crops, "n_crops_baseline": n_base,
                "analytic_us_per_crop": 1e6 * analytic_s / n_crops,
                "position_map_us_per_crop": 1e6 * base_s / n_base,
                "max_disagreement_cells": float(disagreement.max()),
                "mean_disagreement_cells": float(disagreement.mean()),
            })
        a_us = statistics.mean(k["analytic_us_per_crop"] for k in per_kind)
        b_us = statistics.mean(k["position_map_us_per_crop"] for k in per_kind)
        results.append({"source": name, "source_hw": [height, width], "crops": per_kind,
                        "analytic_us_per_crop": a_us, "position_map_us_per_crop": b_us,
                        "speedup": _ratio(b_us, a_us),
                        "max_disagreement_cells": max(k["max_disagreement_cells"] for k in per_kind)})
    return {
        "baseline": f"2xHxW pixel-centre map, torchvision resized_crop ({c.interpolation}, "
                    "antialias) + hflip, adaptive_avg_pool2d to the grid; map built once per source",
        "cases": results,
        "min_speedup": min(r["speedup"] for r in results),
        "max_disagreement_cells": max(r["max_disagreement_cells"] for r in results),
    }


# ----------------------------------------------------------------------------------------
# Training-step harness: the real train_step on a fixed batch


@dataclasses.dataclass
class StepHarness:
    name: str
    ctx: Any  # glsd.train.pretrain.Context
    batch: Any
    step0: int
    match_seconds: list[float] = dataclasses.field(default_factory=list)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    calls: int = 0

    def step(self, timed: bool = True) -> None:
        from glsd.train.pretrain import train_step

        ctx = self.ctx
        n = self.calls
        self.calls += 1
        step = min(self.step0 + n, ctx.sched.total_steps - 1)
        self._match_acc = 0.0
        t = time.perf_counter()
        train_step(ctx, self.batch, step, want_stats=False)
        _sync(ctx.device)
        dt = time.perf_counter() - t
        if timed:
            self.step_seconds.append(dt)
            self.match_seconds.append(self._match_acc)

    def instrument_match(self) -> None:
        """Time every GlobalLocalObjective.match call (with a device sync around it)."""
        objective = self.ctx.objective
        real = objective.match
        device = self.ctx.device

        def timed_match(*args, **kwargs):
            _sync(device)
            t = time.perf_counter()
            out = real(*args, **kwargs)
            _sync(device)
            self._match_acc += time.perf_counter() - t
            return out

        objective.match = timed_match
        self._match_acc = 0.0

    def summary(self) -> dict:
        batch = self.ctx.cfg.train.batch_size
        med = _median(self.step_seconds)
        return {"images_per_s": _ratio(batch, med), "step_ms": 1e3 * med,
                "step_ms_all": [round(1e3 * s, 2) for s in self.step_seconds],
                "match_ms": 1e3 * _median(self.match_seconds),
                "match_share": _ratio(sum(self.match_seconds), sum(self.step_seconds))}


def _has_conv(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def build_harness(name: str, cfg: Config, device: torch.device, batch, *, fused_adamw: bool = False,
                  channels_last: bool = False, compile_model: bool = False,
                  steps_per_epoch: int = 100) -> StepHarness:
    """Student, teacher, objective, AdamW and schedules exactly as pretraining builds them."""
    from glsd.models.heads import build_network, build_teacher
    from glsd.train.objective import GlobalLocalObjective
    from glsd.train.distributed import DistInfo
    from glsd.train.pretrain import Context, param_groups, resolve_precision
    from glsd.train.schedules import Schedules
    from glsd.data.loader import StepViews

    torch.manual_seed(cfg.train.seed)
    student = build_network(cfg).to(device)
    teacher = build_teacher(cfg, student).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
        if batch.views is not None:
            batch = dataclasses.replace(batch, views=[v.contiguous(memory_format=torch.channels_last)
                                                      for v in batch.views])
    if compile_model:  # the backbones only (heads and loss stay eager)
        student.backbone = torch.compile(student.backbone)
        teacher.backbone = torch.compile(teacher.backbone)
    objective = GlobalLocalObjective(cfg).to(device)
    if fused_adamw:
        optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, fused=True)
    else:
        optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, foreach=True)
    amp = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    sched = Schedules(cfg, steps_per_epoch, cfg.train.batch_size)
    ctx = Context(cfg=cfg, run=None, dinfo=DistInfo(), device=device, amp_dtype=amp, model=student,
                  student=student, teacher=teacher, objective=objective, optimizer=optimizer,
                  scaler=scaler, sched=sched, loader=None, sampler=None, views=StepViews(cfg))
    step0 = min(sched.freeze_last_layer_steps, sched.total_steps - 1)  # last layer trains
    harness = StepHarness(name, ctx, batch, step0)
    harness.instrument_match()
    return harness


def run_interleaved(harnesses: Sequence[StepHarness], warmup: int, reps: int) -> None:
    """Warm every harness up, then time one step of each in turn, ``reps`` rounds."""
    for h in harnesses:
        for _ in range(warmup):
            h.step(timed=False)
    for _ in range(reps):
        for h in harnesses:
            h.step()


def count_step_flops(harness: StepHarness) -> int:
    """FLOPs of one training step (teacher forward, student forward + backward, losses)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        harness.step(timed=False)
    return int(counter.get_total_flops())


def first_batch(cfg: Config):
    """One batch of the config's data, views made (no workers)."""
    from glsd.data.loader import build_loader, select_images

    one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0, augment_on="cpu"))
    _, subset = select_images(one, None)
    loader, _ = build_loader(one, subset, 0, 1, pin_memory=False)
    return next(iter(loader))


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with dotted overrides applied (through the same strict loader)."""
    from glsd.config import _merge, from_dict, parse_overrides, validate

    raw = _merge(to_dict(cfg), parse_overrides(overrides))
    out = from_dict(raw)
    validate(out)
    return out


# ----------------------------------------------------------------------------------------
# 3. Training step


def head_settings(cfg: Config, quick: bool) -> list[tuple[int, int]]:
    """(local_hidden_dim, local_out_dim) pairs: the preset's first, then wider ones."""
    m = cfg.model
    preset = (m.local_hidden_dim or m.hidden_dim, m.local_out_dim or m.out_dim)
    if quick:
        return [preset, (max(8, preset[0] // 2), max(8, preset[1] // 2))]
    wider = [(512, 1024), (2048, 4096)]
    return [preset] + [s for s in wider if s != preset]


def bench_step(cfg: Config, device: torch.device, quick: bool, batch) -> dict:
    warmup, reps = (1, 2) if quick else (2, 5)
    harnesses = []
    for mode in ("none", "similarity", "geometric"):
        harnesses.append(build_harness(mode, with_overrides(cfg, [f"loss.matching={mode}"]), device, batch))
    heads = head_settings(cfg, quick)
    for hidden, out in heads[1:]:
        c = with_overrides(cfg, ["loss.matching=geometric", f"model.local_hidden_dim={hidden}",
                                 f"model.local_out_dim={out}"])
        harnesses.append(build_harness(f"geometric_local{hidden}x{out}", c, device, batch))
    _log(f"step: {len(harnesses)} configurations, {warmup} warm-up + {reps} timed steps each")
    run_interleaved(harnesses, warmup, reps)
    by_name = {h.name: h.summary() for h in harnesses}
    modes = {m: by_name[m] for m in ("none", "similarity", "geometric")}
    flops = {m: count_step_flops(h) for h, m in zip(harnesses[:3], modes)}
    for m in modes:
        modes[m]["flops_per_step"] = flops[m]
        modes[m]["gflops_per_image"] = flops[m] / cfg.train.batch_size / 1e9
    none_ips = modes["none"]["images_per_s"]
    head_rows = []
    for i, (hidden, out) in enumerate(heads):
        name = "geometric" if i == 0 else f"geometric_local{hidden}x{out}"
        row = by_name[name]
        head_rows.append({"local_hidden_dim": hidden, "local_out_dim": out,
                          "images_per_s": row["images_per_s"], "step_ms": row["step_ms"],
                          "match_share": row["match_share"],
                          "ratio_over_none": _ratio(none_ips, row["images_per_s"])})
    m = cfg.model
    return {
        "batch_size": cfg.train.batch_size, "precision": str(harnesses[0].ctx.amp_dtype or "fp32"),
        "backbone": m.backbone, "warmup_steps": warmup, "timed_steps": reps,
        "note": "real train_step (want_stats=False, as on non-logging steps) on one fixed batch; "
                "configurations interleaved step by step",
        "modes": modes,
        "ratio_geometric_over_none": _ratio(none_ips, modes["geometric"]["images_per_s"]),
        "ratio_similarity_over_none": _ratio(none_ips, modes["similarity"]["images_per_s"]),
        "match_share_geometric": modes["geometric"]["match_share"],
        "match_share_similarity": modes["similarity"]["match_share"],
        "local_head": head_rows,
    }


# ----------------------------------------------------------------------------------------
# 2. Data pipeline


def find_zip() -> Optional[Path]:
    env = os.environ.get("GLSD_BENCH_ZIP")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    for c in ZIP_CANDIDATES:
        candidates += [Path.cwd() / c, repo / c]
    return next((p.resolve() for p in candidates if p.is_file()), None)


def _loader_rate(loader, n_batches: int, batch_size: int) -> tuple[dict, Any]:
    """Images/s of a loader after its first batch (which pays the worker start-up), and
    the first batch."""
    it = iter(loader)
    t0 = time.perf_counter()
    first_batch = next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        try:
            next(it)
        except StopIteration:
            break
        n += 1
    dt = time.perf_counter() - t
    del it
    return {"images_per_s": _ratio(n * batch_size, dt), "batches_timed": n,
            "first_batch_s": first}, first_batch


# data.augment_on -> the bench's name of that path, and the ratio that is its headline
# (views in the workers keep their former name, cpu_batched: the same code as then)
HEADLINE_PATH = {"cpu": "cpu_batched", "cpu_batched": "cpu_batched", "device": "device_augment"}
HEADLINE_RATIO = {"cpu": "ratio_cpu_batched_over_step", "cpu_batched": "ratio_cpu_batched_over_step",
                  "device": "ratio_device_loader_over_step"}


def bench_data(cfg: Config, device: torch.device, quick: bool, step_images_per_s: float) -> dict:
    from glsd.data.loader import build_loader, select_images
    from glsd.data.views import ViewMaker

    n_batches = 2 if quick else 8
    need = cfg.train.batch_size * (n_batches + 1)
    sources = {"preset": cfg}
    zip_path = find_zip()
    if zip_path is not None and cfg.data.source == "synthetic":
        sources["cifar10_zip"] = with_overrides(cfg, ["data.source=zip", f"data.root={zip_path}",
                                                      f"data.num_images={need}"])
    out: dict[str, Any] = {"num_workers": cfg.data.num_workers, "batch_size": cfg.train.batch_size,
                           "views_per_image": cfg.crops.num_global + cfg.crops.num_local,
                           "timed_batches": n_batches, "sources": {}}
    for name, c in sources.items():
        if c.data.source == "synthetic" and c.data.synthetic_num_images < need:
            c = with_overrides(c, [f"data.synthetic_num_images={need}"])
        _, subset = select_images(c, None)
        workers = max(1, c.data.num_workers)
        # Views made in the workers: decode, then one batched pass per batch.
        bloader, _ = build_loader(with_overrides(c, ["data.augment_on=cpu"]), subset, 0, 1, pin_memory=False)
        batched, _ = _loader_rate(bloader, n_batches, c.train.batch_size)
        del bloader  # its persistent workers would go on prefetching during the next timing
        batched["ms_per_image_per_worker"] = _ratio(1e3 * workers, batched["images_per_s"])
        # Views made on the device: the workers decode to uint8 and draw the parameters.
        dloader, _ = build_loader(with_overrides(c, ["data.augment_on=device"]), subset, 0, 1, pin_memory=False)
        raw, raw_batch = _loader_rate(dloader, n_batches, c.train.batch_size)
        del dloader
        images = raw_batch.images.to(device)
        maker = ViewMaker(c.crops)
        aug_s = _median(_time_calls(lambda: maker(images, raw_batch.params),
                                    reps=3 if quick else 7, warmup=1, device=device))
        aug_ips = _ratio(c.train.batch_size, aug_s)
        serial = _ratio(1.0, 1.0 / raw["images_per_s"] + 1.0 / aug_ips)
        out["sources"][name] = {
            "source": c.data.source, "root": c.data.root,
            "image_size": (c.data.synthetic_image_size if c.data.source == "synthetic" else None),
            "cpu_batched": batched,
            "device_augment": {"loader_uint8": raw, "augment_images_per_s": aug_ips,
                               "augment_ms_per_batch": 1e3 * aug_s, "augment_device": str(device),
                               "serial_images_per_s": serial},
            "ratio_cpu_batched_over_step": _ratio(batched["images_per_s"], step_images_per_s),
            # Device path: the loader only decodes, and the step also pays the augmentation.
            "ratio_device_loader_over_step": _ratio(
                raw["images_per_s"], _ratio(1.0, 1.0 / step_images_per_s + 1.0 / aug_ips)),
        }
        # The headline is the path the preset trains with.
        out["sources"][name]["ratio_pipeline_over_step"] = out["sources"][name][HEADLINE_RATIO[cfg.data.augment_on]]
    headline = "cifar10_zip" if "cifar10_zip" in out["sources"] else "preset"
    out["headline_source"] = headline
    out["headline_path"] = HEADLINE_PATH[cfg.data.augment_on]
    out["step_images_per_s"] = step_images_per_s
    out["ratio_pipeline_over_step"] = out["sources"][headline]["ratio_pipeline_over_step"]
    return out


# ----------------------------------------------------------------------------------------
# 4. Utilisation


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    secs = _median(_time_calls(lambda: a @ b, reps, warmup=2, device=device))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": secs,
            "flops_per_s": 2 * n ** 3 / secs}


def bench_utilisation(cfg: Config, device: torch.device, quick: bool, batch, compile_model: bool) -> dict:
    from glsd.train.pretrain import resolve_precision

    n = 256 if quick else 2048
    reps = 3 if quick else 5
    peaks = {"fp32": matmul_peak(device, n, torch.float32, reps),
             "bf16": matmul_peak(device, n, torch.bfloat16, reps)}
    fp32 = build_harness("fp32", with_overrides(cfg, ["train.precision=fp32"]), device, batch)
    conv = _has_conv(fp32.ctx.student.backbone)
    variants: list[tuple[str, list[str], dict]] = [
        ("bf16", ["train.precision=bf16"], {}),
        ("bf16_fused_adamw", ["train.precision=bf16"], {"fused_adamw": True}),
    ]
    if conv:
        variants.append(("bf16_channels_last", ["train.precision=bf16"], {"channels_last": True}))
    if compile_model:
        variants.append(("bf16_compile", ["train.precision=bf16"], {"compile_model": True}))
    harnesses = [fp32] + [build_harness(name, with_overrides(cfg, ov), device, batch, **kw)
                          for name, ov, kw in variants]
    warmup, timed = (1, 2) if quick else (2, 4)
    if compile_model:
        warmup += 1  # compilation happens in the first steps (two view sizes)
    _log(f"utilisation: {len(harnesses)} variants, {warmup} warm-up + {timed} timed steps each")
    run_interleaved(harnesses, warmup, timed)
    flops = count_step_flops(harnesses[0])
    rows = {}
    for h in harnesses:
        s = h.summary()
        dtype = "bf16" if h.ctx.amp_dtype == torch.bfloat16 else "fp32"
        achieved = _ratio(flops, s["step_ms"] / 1e3)
        rows[h.name] = {"images_per_s": s["images_per_s"], "step_ms": s["step_ms"],
                        "achieved_flops_per_s": achieved, "peak": dtype,
                        "utilisation": _ratio(achieved, peaks[dtype]["flops_per_s"])}
    base = rows["fp32"]["images_per_s"]
    for r in rows.values():
        r["speedup_over_fp32"] = _ratio(r["images_per_s"], base)
    opt = bench_optimizer_step(cfg, device, quick, batch)
    return {
        "flops_per_step": flops, "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one step",
        "matmul_peak": peaks, "variants": rows, "channels_last_applicable": conv,
        "compile": "measured" if compile_model else "off (pass --compile)",
        "default_precision": str(resolve_precision(cfg.train.precision, device) or "fp32"),
        "optimizer_step": opt, "allocator": allocator_info(),
    }


def bench_optimizer_step(cfg: Config, device: torch.device, quick: bool, batch) -> dict:
    """optimizer.step alone: foreach vs fused AdamW on the student's parameters."""
    from glsd.models.heads import build_network
    from glsd.train.pretrain import param_groups

    net = build_network(cfg).to(device)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for name, kw in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(param_groups(net), lr=1e-4, **kw)
        out[f"{name}_ms"] = 1e3 * _median(_time_calls(opt.step, 5 if quick else 20, warmup=2, device=device))
    out["speedup_fused"] = _ratio(out["foreach_ms"], out["fused_ms"])
    out["n_params"] = sum(p.numel() for p in net.parameters())
    return out


# ----------------------------------------------------------------------------------------
# 5. k-NN


def _rss_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_knn(device: torch.device, quick: bool) -> dict:
    import resource

    from glsd.eval.knn import SIM_BUDGET, auto_chunk, knn_classify

    n_train, n_test, dim, classes = (4000, 1000, 128, 10) if quick else (50000, 10000, 128, 10)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n_train, dim, generator=g).to(device)
    test = torch.randn(n_test, dim, generator=g).to(device)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    run = lambda: knn_classify(train, y_train, test, y_test, classes)  # noqa: E731
    run_small = lambda: knn_classify(train[:1000], y_train[:1000], test[:100], y_test[:100], classes)  # noqa: E731
    run_small()  # warm-up (allocator, kernels) on a small slice: the timed run is the real size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_peak_rss()
    rss0 = _rss_kib("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = _time_calls(run, reps=1 if quick else 2, warmup=0, device=device)
    hwm = _rss_kib("VmHWM")
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset and hwm is not None and rss0 is not None:
        peak_mib, method = (hwm - rss0) / 1024, "VmHWM after clear_refs reset - VmRSS before"
    else:
        peak_mib, method = (maxrss1 - maxrss0) / 1024, "ru_maxrss delta (0 if an earlier peak was higher)"
    secs = _median(times)
    chunk = auto_chunk(n_train, n_test)
    out = {"n_train": n_train, "n_test": n_test, "dim": dim, "num_classes": classes,
           "ks": [10, 20, 100, 200], "seconds": secs, "test_features_per_s": _ratio(n_test, secs),
           "similarities_per_s": _ratio(n_train * n_test, secs),
           "peak_rss_delta_mib": peak_mib, "peak_method": method,
           "chunk_rows": chunk, "chunk_similarity_mib": chunk * n_train * 4 / 2 ** 20,
           "sim_budget_mib": SIM_BUDGET * 4 / 2 ** 20}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


# ----------------------------------------------------------------------------------------
# Paper-like step on an accelerator (benchmarks/gpu_bench.sh)

PAPER_SWIN_T = [
    "model.backbone=swin_tiny_patch4_window7_224", "model.global_feature=pooled",
    "model.drop_path_rate=0.1",
    "crops.global_size=224", "crops.local_size=96", "crops.num_global=2", "crops.num_local=8",
    "crops.global_scale=[0.4, 1.0]", "crops.local_scale=[0.05, 0.4]",
    "model.out_dim=65536", "model.hidden_dim=2048", "model.bottleneck_dim=256",
    "model.local_out_dim=65536", "model.local_hidden_dim=2048",
    "train.batch_size=64", "train.precision=bf16", "data.augment_on=device",
    "data.source=synthetic", "train.epochs=300", "train.warmup_epochs=10", "crops.blur_radius_reference=null",
]
PAPER_VIT_S16 = [o for o in PAPER_SWIN_T if not o.startswith(("model.backbone=", "model.global_feature="))] + [
    "model.backbone=vit_small_patch16_224", "model.global_feature=cls"]
# A tiny stand-in that runs the same code path on a CPU in seconds (tests).
TINY_DEVICE_STEP = [
    "model.backbone=vit_tiny_patch16_224", "model.patch_size=8",
    "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "model.global_feature=cls",
    "crops.global_size=32", "crops.local_size=16", "crops.num_global=2", "crops.num_local=2",
    "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
    "model.local_out_dim=64", "model.local_hidden_dim=32",
    "train.batch_size=4", "train.precision=bf16", "data.augment_on=device", "data.source=synthetic",
]


def device_batch(cfg: Config, device: torch.device, source_hw=(375, 500)):
    """A Batch whose views are made on the device: random uint8 images (already there) of
    the decoded size and drawn view parameters for images of ``source_hw``."""
    from glsd.data.multicrop import Batch, decode_size
    from glsd.data.view_params import draw_view_params, geometry, training_seed

    size, b = decode_size(cfg.crops), cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8).to(device)
    hw = torch.tensor([list(source_hw)] * b, dtype=torch.float32)
    params = draw_view_params(cfg.crops, [training_seed(0, 0, i, i) for i in range(b)], hw)
    return Batch(geometry(params, hw), torch.zeros(b, dtype=torch.long), torch.arange(b), 0,
                 images=images, params=params)


def bench_device_step(overrides: Sequence[str], device: torch.device, warmup: int, reps: int,
                      modes: Sequence[str] = ("none", "geometric"), source_hw=(375, 500)) -> dict:
    """images/s of the training step with batched device augmentation (uint8 images already
    on the device, as a loader of ``data.augment_on=device`` delivers them), per matching."""
    from glsd.data.views import ViewMaker

    cfg = load_config(None, list(overrides))
    raw = device_batch(cfg, device, source_hw)
    size, b = raw.images.shape[-1], cfg.train.batch_size
    maker = ViewMaker(cfg.crops)
    aug_s = _median(_time_calls(lambda: maker(raw.images, raw.params), max(3, reps // 2),
                                warmup=2, device=device))
    results: dict[str, Any] = {}
    harnesses = []
    for mode in modes:
        c = with_overrides(cfg, [f"loss.matching={mode}"])
        try:
            h = build_harness(mode, c, device, raw, steps_per_epoch=1000)
            for _ in range(warmup):
                h.step(timed=False)
            harnesses.append(h)
        except torch.cuda.OutOfMemoryError as e:  # record it, keep the other modes
            results[mode] = {"error": f"out of memory: {e}"[:500]}
            torch.cuda.empty_cache()
    for _ in range(reps):
        for h in harnesses:
            h.step()
    for h in harnesses:
        s = h.summary()
        if device.type == "cuda":
            s["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        results[h.name] = s
    flops = {}
    for h in harnesses:
        try:
            flops[h.name] = count_step_flops(h)
            results[h.name]["flops_per_step"] = flops[h.name]
            results[h.name]["achieved_flops_per_s"] = _ratio(flops[h.name], results[h.name]["step_ms"] / 1e3)
        except Exception as e:  # noqa: BLE001 - the counter is a diagnostic
            results[h.name]["flops_error"] = repr(e)[:300]
    ips = {m: r.get("images_per_s", float("nan")) for m, r in results.items()}
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 256, torch.bfloat16, 5)
    return {
        "config_overrides": list(overrides), "batch_size": b, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "input_size": size, "source_hw": list(source_hw), "warmup_steps": warmup, "timed_steps": reps,
        "augment_ms_per_batch": 1e3 * aug_s, "augment_images_per_s": _ratio(b, aug_s),
        "modes": results,
        "ratio_geometric_over_none": _ratio(ips.get("none", float("nan")), ips.get("geometric", float("nan"))),
        "matmul_peak_bf16": peak,
        "note": "images/s of train_step including device augmentation from uint8 images already "
                "on the device (disk decoding excluded); bf16 autocast",
    }


# ----------------------------------------------------------------------------------------


def _check_targets(result: dict) -> list[dict]:
    rows = []
    for key, (op, threshold) in TARGETS.items():
        section, name = key.split(".", 1)
        value = result.get(section, {}).get(name)
        if value is None:
            continue
        met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[op]
        rows.append({"name": key, "value": value, "target": f"{op} {threshold}", "met": bool(met)})
    return rows


def _finite(obj):
    """NaN / inf -> None so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run_bench(preset: Optional[str] = DEFAULT_PRESET, overrides: Sequence[str] = (), quick: bool = False,
              sections: Optional[Sequence[str]] = None, compile_model: bool = False,
              threads: Optional[int] = None) -> dict:
    """Run the chosen sections (default: all) and return one JSON-able dict."""
    sections = list(sections or SECTIONS)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ConfigError(f"unknown bench section(s) {bad}; choose from {', '.join(SECTIONS)}")
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_bench(preset, overrides, quick, sections, compile_model)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(preset, overrides, quick, sections, compile_model) -> dict:
    from glsd.models.backbone import build_backbone
    from glsd.train.pretrain import resolve_device

    start = time.perf_counter()
    cfg = load_config(preset, list(overrides))
    if quick:  # smoke mode: small batch, few images; the rest of the preset as it is
        cfg = with_overrides(cfg, ["train.batch_size=8", "data.synthetic_num_images=64"])
    cfg = with_overrides(cfg, ["train.progress=false"])
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "schema": SCHEMA, "preset": preset, "overrides": list(overrides), "quick": quick,
        "sections": sections, "env": environment(device),
        "config": {k: to_dict(cfg)[k] for k in ("data", "crops", "model", "loss")} | {
            "batch_size": cfg.train.batch_size, "precision": cfg.train.precision},
    }
    grids = {}
    if "geometry" in sections:
        probe = build_backbone(cfg.model, cfg.crops.global_size)
        grids = {s: probe.grid_size((s, s)) for s in (cfg.crops.global_size, cfg.crops.local_size)}
    batch = first_batch(cfg) if any(s in sections for s in ("step", "data", "utilisation")) else None
    timings = {}
    for name in SECTIONS:  # fixed order: step before data (data's ratio uses the step)
        if name not in sections:
            continue
        t = time.perf_counter()
        _log(f"section {name} ...")
        if name == "geometry":
            result[name] = bench_geometry(cfg, quick, grids)
        elif name == "step":
            result[name] = bench_step(cfg, device, quick, batch)
        elif name == "data":
            step_ips = result.get("step", {}).get("modes", {}).get(cfg.loss.matching, {}).get("images_per_s")
            if step_ips is None:  # the step section was not run: a short measurement here
                h = build_harness(cfg.loss.matching, cfg, device, batch)
                run_interleaved([h], 1, 2 if quick else 4)
                step_ips = h.summary()["images_per_s"]
            result[name] = bench_data(cfg, device, quick, step_ips)
        elif name == "utilisation":
            result[name] = bench_utilisation(cfg, device, quick, batch, compile_model)
        elif name == "knn":
            result[name] = bench_knn(device, quick)
        timings[name] = round(time.perf_counter() - t, 2)
        _log(f"section {name}: {timings[name]} s")
    result["env"]["load_avg_end"] = _load_avg()
    result["targets"] = _check_targets(result)
    result["section_seconds"] = timings
    result["elapsed_s"] = round(time.perf_counter() - start, 2)
    return _finite(result)


def write_json(result: dict, path: Optional[str]) -> str:
    text = json.dumps(result, indent=2, allow_nan=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text
