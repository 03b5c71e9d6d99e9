"""A paper-like step on an accelerator (``benchmarks/gpu_bench.py``): the ``imagenet-swin-t``
preset (Swin-T/7, 2 x 224 + 8 x 96 crops, 65536 prototypes) at batch 64, bf16, batched device
augmentation, per matching."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from glsd.config import Config, apply_overrides, load_config
from glsd.tools.bench.common import cpu_model, median, ratio, time_calls
from glsd.tools.bench.harness import build_harness, count_step_flops, run_interleaved
from glsd.tools.bench.step import matmul_peak

PAPER_PRESET = "imagenet-swin-t"
# What the bench changes in the preset: a batch that fills a GPU, bf16, views made on the device
# from synthetic images (disk decoding is not what this measures).
PAPER_STEP = ["train.batch_size=64", "train.precision=bf16", "data.augment_on=device",
              "data.source=synthetic"]
PAPER_MODELS = {"swin_t": [],
                "vit_s16": ["model.backbone=vit_small_patch16_224", "model.global_feature=cls"]}


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


def bench_device_step(preset: Optional[str], overrides: Sequence[str], device: torch.device, warmup: int,
                      reps: int, modes: Sequence[str] = ("none", "geometric"), source_hw=(375, 500)) -> dict:
    """images/s of the training step with batched device augmentation (uint8 images already
    on the device, as a loader of ``data.augment_on=device`` delivers them), per matching, for
    ``preset`` (None: the defaults) with ``overrides``."""
    from glsd.data.views import ViewMaker

    cfg = load_config(preset, list(overrides))
    raw = device_batch(cfg, device, source_hw)
    size, b = raw.images.shape[-1], cfg.train.batch_size
    maker = ViewMaker(cfg.crops)
    aug_s = median(time_calls(lambda: maker(raw.images, raw.params), max(3, reps // 2),
                              warmup=2, device=device))
    results: dict[str, Any] = {}
    harnesses = []
    for mode in modes:
        c = apply_overrides(cfg, [f"loss.matching={mode}"])
        try:
            h = build_harness(mode, c, device, raw, steps_per_epoch=1000)
            for _ in range(warmup):
                h.step(timed=False)
            harnesses.append(h)
        except torch.cuda.OutOfMemoryError as e:  # record it, keep the other modes
            results[mode] = {"error": f"out of memory: {e}"[:500]}
            torch.cuda.empty_cache()
    run_interleaved(harnesses, warmup=0, reps=max(1, reps))  # warmed up above, arm by arm
    for h in harnesses:
        s = h.summary()
        if device.type == "cuda":
            # the process's peak with every arm built and stepped in turn: not one arm's
            s["peak_memory_gib_all_arms"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        results[h.name] = s
    flops = {}
    for h in harnesses:
        try:
            flops[h.name] = count_step_flops(h)
            results[h.name]["flops_per_step"] = flops[h.name]
            results[h.name]["achieved_flops_per_s"] = ratio(flops[h.name], results[h.name]["step_ms"] / 1e3)
        except Exception as e:  # noqa: BLE001 - the counter is a diagnostic
            results[h.name]["flops_error"] = repr(e)[:300]
    ips = {m: r.get("images_per_s", float("nan")) for m, r in results.items()}
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 256, torch.bfloat16, 5)
    return {
        "preset": preset, "config_overrides": list(overrides), "batch_size": b, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "input_size": size, "source_hw": list(source_hw), "warmup_steps": warmup, "timed_steps": reps,
        "augment_ms_per_batch": 1e3 * aug_s, "augment_images_per_s": ratio(b, aug_s),
        "modes": results,
        "ratio_geometric_over_none": ratio(ips.get("none", float("nan")), ips.get("geometric", float("nan"))),
        "matmul_peak_bf16": peak,
        "note": "images/s of train_step including device augmentation from uint8 images already "
                "on the device (disk decoding excluded); bf16 autocast",
    }
