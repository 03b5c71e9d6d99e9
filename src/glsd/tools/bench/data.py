"""Data section: images/s of the view pipeline (:mod:`glsd.data.views`) against the training
step, in both places it runs: in the loader workers (``augment_on=cpu``, reported as
``cpu_batched``) and on the device (loader that decodes to uint8, plus the batched views)."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch

from glsd.config import Config, apply_overrides
from glsd.tools.bench.common import median, ratio, time_calls


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
    return {"images_per_s": ratio(n * batch_size, dt), "batches_timed": n,
            "first_batch_s": first}, first_batch


# data.augment_on -> the bench's name of that path, and the ratio that is its headline
# (views in the workers keep their former name, cpu_batched: the same code as then)
HEADLINE_PATH = {"cpu": "cpu_batched", "cpu_batched": "cpu_batched", "device": "device_augment"}
HEADLINE_RATIO = {"cpu": "ratio_cpu_batched_over_step", "cpu_batched": "ratio_cpu_batched_over_step",
                  "device": "ratio_device_loader_over_step"}


def bench_data(cfg: Config, device: torch.device, quick: bool, step_images_per_s: float,
               data: Optional[str] = None) -> dict:
    """Images/s of every view pipeline on the preset's images and, with ``data`` (``glsd
    bench --data PATH``: a folder or zip of real images), on those; the headline is the
    given data, decoded from disk, through the path the preset trains with."""
    from glsd.data.loader import build_loader
    from glsd.data.subset import select_images
    from glsd.data.views import ViewMaker

    n_batches = 2 if quick else 8
    need = cfg.train.batch_size * (n_batches + 1)
    sources = {"preset": cfg}
    if data is not None and cfg.data.root != data:
        sources["data"] = apply_overrides(cfg, ["data.source=auto", f"data.root={data}",
                                                f"data.num_images={need}"])
    out: dict[str, Any] = {"num_workers": cfg.data.num_workers, "batch_size": cfg.train.batch_size,
                           "views_per_image": cfg.crops.num_global + cfg.crops.num_local,
                           "timed_batches": n_batches, "sources": {}}
    for name, c in sources.items():
        if c.data.source == "synthetic" and c.data.synthetic_num_images < need:
            c = apply_overrides(c, [f"data.synthetic_num_images={need}"])
        subset = select_images(c, None)
        workers = max(1, c.data.num_workers)
        # Views made in the workers: decode, then one batched pass per batch.
        bloader = build_loader(apply_overrides(c, ["data.augment_on=cpu"]), subset, 0, 1, pin_memory=False)[0]
        batched, _ = _loader_rate(bloader, n_batches, c.train.batch_size)
        del bloader  # its persistent workers would go on prefetching during the next timing
        batched["ms_per_image_per_worker"] = ratio(1e3 * workers, batched["images_per_s"])
        # Views made on the device: the workers decode to uint8 and draw the parameters.
        dloader = build_loader(apply_overrides(c, ["data.augment_on=device"]), subset, 0, 1, pin_memory=False)[0]
        raw, raw_batch = _loader_rate(dloader, n_batches, c.train.batch_size)
        del dloader
        images = raw_batch.images.to(device)
        maker = ViewMaker(c.crops)
        aug_s = median(time_calls(lambda: maker(images, raw_batch.params),
                                  reps=3 if quick else 7, warmup=1, device=device))
        aug_ips = ratio(c.train.batch_size, aug_s)
        serial = ratio(1.0, 1.0 / raw["images_per_s"] + 1.0 / aug_ips)
        out["sources"][name] = {
            "source": c.data.source, "root": c.data.root,
            "image_size": (c.data.synthetic_image_size if c.data.source == "synthetic" else None),
            "cpu_batched": batched,
            "device_augment": {"loader_uint8": raw, "augment_images_per_s": aug_ips,
                               "augment_ms_per_batch": 1e3 * aug_s, "augment_device": str(device),
                               "serial_images_per_s": serial},
            "ratio_cpu_batched_over_step": ratio(batched["images_per_s"], step_images_per_s),
            # Device path: the loader only decodes, and the step also pays the augmentation.
            "ratio_device_loader_over_step": ratio(
                raw["images_per_s"], ratio(1.0, 1.0 / step_images_per_s + 1.0 / aug_ips)),
        }
        # The headline is the path the preset trains with.
        out["sources"][name]["ratio_pipeline_over_step"] = out["sources"][name][HEADLINE_RATIO[cfg.data.augment_on]]
    headline = "data" if "data" in out["sources"] else "preset"
    if headline == "preset" and cfg.data.source == "synthetic":
        out["note"] = "synthetic images only (no decoding from disk): pass --data PATH to measure real images"
    out["headline_source"] = headline
    out["headline_path"] = HEADLINE_PATH[cfg.data.augment_on]
    out["step_images_per_s"] = step_images_per_s
    out["ratio_pipeline_over_step"] = out["sources"][headline]["ratio_pipeline_over_step"]
    return out
