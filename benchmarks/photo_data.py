#!/usr/bin/env python
"""The real-photo data path: decode + views per second per worker against the training step.

Makes a folder of JPEGs of varied sizes (CIFAR-10 images from ``--zip`` upscaled to 300x400 ..
800x600, or generated images without it), then, with the ``photos-vit-s16`` preset's crops
(2 x 224 + 6 x 96, decoded to a 256 px square first), measures in one thread (what one
loader worker has):

- ``pil``: a full-size decode (PIL open + load + RGB, resize to the square, uint8 tensor),
  glsd's loader with ``data.jpeg_draft=false``;
- ``pil_draft``: glsd's loader as it is (``data.jpeg_draft=true``): a JPEG decoded at 1/2..1/8
  scale in the DCT, both sides still at least the square;
- ``tv_cpu``: ``torchvision.io.decode_jpeg`` on the CPU, resized with antialiased bicubic;
- ``tv_cuda`` (when CUDA is available): ``decode_jpeg(list, device="cuda")`` batched, resized
  on the GPU;

each as decode only and decode + views (:class:`glsd.data.views.ViewMaker` on the decoded
squares, batched, ``data.augment_on=cpu``). The step of that preset (``build_harness``, views
made beforehand) is timed at ``--step-batch`` (``--no-step`` skips it), and each path's
images/s with ``data.num_workers`` workers is set against it.

    python benchmarks/photo_data.py --zip PATH/cifar10-jpg.zip --out benchmarks/results/photo-data-cpu.json
    python benchmarks/photo_data.py --photo-sizes 4000x3000,3024x4032 --images 16 --no-step  # phone photos
    python benchmarks/photo_data.py --quick     # smoke test: tiny images, 1 iteration
"""
from __future__ import annotations

import argparse
import io
import shlex
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from glsd.config import load_config  # noqa: E402
from glsd.tools.bench import environment, write_json  # noqa: E402
from glsd.tools.bench.common import finite, log, ratio  # noqa: E402

SCHEMA = "glsd-photo-data/1"
PRESET = "photos-vit-s16"
SIZES = [(300, 400), (400, 300), (375, 500), (500, 375), (480, 640), (640, 480), (600, 800), (800, 600)]
QUICK_SIZES = [(40, 56), (56, 40), (48, 64)]
QUICK_STEP = ["model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "model.out_dim=64",
              "model.hidden_dim=32", "model.bottleneck_dim=16", "model.local_out_dim=32",
              "model.local_hidden_dim=16", "model.local_bottleneck_dim=16"]


def make_images(out: Path, n: int, sizes, zip_path: str | None, seed: int = 0) -> list[Path]:
    """``n`` JPEGs (quality 90) of the given (h, w) sizes in turn: CIFAR images upscaled
    (bicubic) from ``zip_path``, or smooth random images."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = []
    if zip_path:
        with zipfile.ZipFile(zip_path) as z:
            names = sorted(m for m in z.namelist() if m.lower().endswith((".jpg", ".jpeg", ".png")))
            if not names:
                raise SystemExit(f"photo_data: no images in {zip_path}")
            for m in names[:: max(1, len(names) // n)][:n]:
                with z.open(m) as f:
                    sources.append(Image.open(io.BytesIO(f.read())).convert("RGB"))
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        if sources:
            img = sources[i % len(sources)]
        else:  # low-frequency colour noise: compresses like a photo, not like white noise
            img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        p = out / f"img{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def pil_decode(path: Path, size: int, draft: bool) -> torch.Tensor:
    """(3, size, size) uint8, as glsd's loader (``read_image_file`` + ``DecodeToSquare``) makes
    it, with ``data.jpeg_draft`` = ``draft``."""
    from glsd.data.image_file import read_image_file
    from glsd.data.multicrop import DecodeToSquare

    return DecodeToSquare(size)(read_image_file(path, size if draft else 0))[0]


def _to_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic to the square, in uint8 on the CPU (as PIL resizes: a float32 copy
    of a 12-megapixel frame would time the conversion, not the decoder), in float32 on a GPU."""
    if img.device.type == "cpu":
        return F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    x = F.interpolate(img[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp_(0, 255).round_().to(torch.uint8)[0]


def tv_decode(path: Path, size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
        warnings.simplefilter("ignore")
        return _to_square(decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB), size)


def tv_cuda_decode(paths: list[Path], size: int, device: torch.device) -> torch.Tensor:
    """Batched GPU decode of the files' bytes (read on the host), resized on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = [read_file(str(p)) for p in paths]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return torch.stack([_to_square(im, size) for im in images])


def time_path(name: str, decode_batch, paths: list[Path], batch: int, iters: int, maker, cfg, device) -> dict:
    """Decode (and decode + views) images/s over ``iters`` passes through ``paths`` in batches."""
    from glsd.data.view_params import draw_view_params, training_seed

    decode_s, views_s, n = [], [], 0
    hw_of = {}
    for p in paths:
        with Image.open(p) as im:
            hw_of[p] = [float(im.size[1]), float(im.size[0])]
    warm = decode_batch(paths[:batch])  # warm-up (lazy imports, CUDA context, allocator)
    warm_hw = torch.tensor([hw_of[p] for p in paths[:batch]])
    # The view maker's first call too: else it lands in the first path's views time only.
    maker(warm.to(device), draw_view_params(cfg.crops, [training_seed(0, 0, j, j) for j in range(len(warm))], warm_hw))
    for _ in range(iters):
        for i in range(0, len(paths), batch):
            chunk = paths[i:i + batch]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            images = decode_batch(chunk)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            hw = torch.tensor([hw_of[p] for p in chunk])
            params = draw_view_params(cfg.crops, [training_seed(0, 0, j, j) for j in range(len(chunk))], hw)
            t2 = time.perf_counter()
            maker(images.to(device), params)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            views_s.append(time.perf_counter() - t2)
            decode_s.append(t1 - t)
            n += len(chunk)
    dec, views = sum(decode_s), sum(views_s)
    return {"path": name, "images": n, "device": str(device),
            "decode_images_per_s": ratio(n, dec), "views_images_per_s": ratio(n, views),
            "decode_and_views_images_per_s": ratio(n, dec + views),
            "decode_ms_per_image": ratio(1e3 * dec, n)}


def time_step(cfg, device: torch.device, warmup: int, steps: int) -> dict:
    """The preset's training step (views made beforehand, geometric matching as shipped)."""
    from glsd.data.multicrop import Batch
    from glsd.data.views import ViewMaker
    from glsd.tools.bench.device import device_batch
    from glsd.tools.bench.harness import build_harness

    raw = device_batch(cfg, device)
    with torch.no_grad():
        views = ViewMaker(cfg.crops)(raw.images, raw.params)
    batch = Batch(raw.geometry.to(device), raw.labels, raw.indices, 0, views=views)
    h = build_harness("step", cfg, device, batch)
    for _ in range(warmup):
        h.step(timed=False)
    for _ in range(steps):
        h.step()
    s = h.summary()
    return {"batch_size": cfg.train.batch_size, "matching": cfg.loss.matching, "device": str(device),
            "images_per_s": s["images_per_s"], "step_ms": s["step_ms"], "step_ms_all": s["step_ms_all"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of the preset")
    ap.add_argument("--zip", help="CIFAR-10 JPEG zip (or any zip of images) to upscale; default: generated images")
    ap.add_argument("--images", type=int, default=64, help="JPEGs in the folder")
    ap.add_argument("--photo-sizes", help="WxH,WxH,... of the JPEGs (default: 300x400 .. 800x600)")
    ap.add_argument("--folder", help="keep the JPEGs here (default: a temporary folder)")
    ap.add_argument("--batch", type=int, default=32, help="images per decode + views batch")
    ap.add_argument("--iters", type=int, default=3, help="passes over the folder per path")
    ap.add_argument("--no-step", action="store_true", help="skip the training step")
    ap.add_argument("--step-batch", type=int, help="training step batch (default: 64 on CUDA, 8 on CPU)")
    ap.add_argument("--step-warmup", type=int, default=1)
    ap.add_argument("--step-steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of the step and of the tv_cuda path")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--quick", action="store_true", help="tiny images, 4 of them, 1 iteration, tiny step")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.iters = 4, 2, 1
        args.step_batch, args.step_warmup, args.step_steps = args.step_batch or 2, 0, 1
    device = torch.device(args.device)
    step_batch = args.step_batch or (64 if device.type == "cuda" else 8)
    cfg = load_config(PRESET, [f"train.batch_size={step_batch}", f"device={device.type}",
                               *(QUICK_STEP if args.quick else []), *args.overrides])
    from glsd.data.multicrop import decode_size
    from glsd.data.views import ViewMaker

    size = decode_size(cfg.crops)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        sizes = ([tuple(int(v) for v in s.split("x"))[::-1] for s in args.photo_sizes.split(",")]
                 if args.photo_sizes else QUICK_SIZES if args.quick else SIZES)  # (h, w)
        paths = make_images(folder, args.images, sizes, args.zip)
        n_bytes = sum(p.stat().st_size for p in paths)
        log(f"{len(paths)} JPEGs ({n_bytes / len(paths) / 1e3:.0f} kB each) in {folder}")
        tv_cuda_error = None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one loader worker's share
        cpu = torch.device("cpu")
        maker = ViewMaker(cfg.crops)
        paths_out = {
            "pil": time_path("pil", lambda ps: torch.stack([pil_decode(p, size, False) for p in ps]),
                             paths, args.batch, args.iters, maker, cfg, cpu),
            "pil_draft": time_path("pil_draft", lambda ps: torch.stack([pil_decode(p, size, True) for p in ps]),
                                   paths, args.batch, args.iters, maker, cfg, cpu),
            "tv_cpu": time_path("tv_cpu", lambda ps: torch.stack([tv_decode(p, size) for p in ps]),
                                paths, args.batch, args.iters, maker, cfg, cpu),
        }
        torch.set_num_threads(threads)
        if device.type == "cuda":
            try:  # nvjpeg on that machine is untested from here: a failure keeps the CPU rows
                paths_out["tv_cuda"] = time_path("tv_cuda", lambda ps: tv_cuda_decode(ps, size, device),
                                                 paths, args.batch, args.iters, ViewMaker(cfg.crops), cfg, device)
            except Exception as e:  # noqa: BLE001 - recorded in the JSON
                log(f"tv_cuda failed: {type(e).__name__}: {e}")
                tv_cuda_error = f"{type(e).__name__}: {str(e)[:300]}"
        sizes = sorted({tuple(Image.open(p).size) for p in paths})
    workers = cfg.data.num_workers
    result = {"schema": SCHEMA,
              "command": shlex.join(["python", "benchmarks/photo_data.py", *(sys.argv[1:] if argv is None else argv)]),
              "quick": args.quick, "preset": PRESET, "config_overrides": cfg_overrides(args, step_batch, device),
              "env": environment(device), "num_images": len(paths), "image_sizes_wh": [list(s) for s in sizes],
              "mean_jpeg_kb": n_bytes / len(paths) / 1e3, "source": "zip" if args.zip else "generated",
              "decode_size": size, "crops": {"global": cfg.crops.global_size, "local": cfg.crops.local_size,
                                             "num_global": cfg.crops.num_global, "num_local": cfg.crops.num_local},
              "batch": args.batch, "iters": args.iters, "num_workers": workers,
              "note": "per worker = one thread; *_all_workers = x data.num_workers (CPU paths); "
                      "ratios > 1: the data path keeps up with the step",
              "paths": paths_out, "tv_cuda_error": tv_cuda_error, "step": None}
    write_json(finite(result), args.out)  # the decode rows, before the step (which may fail or be cut)
    step = None if args.no_step else time_step(cfg, device, args.step_warmup, args.step_steps)
    for row in paths_out.values():
        # CPU paths scale with the workers; the GPU path is one process for the whole box.
        scale = 1 if row["path"] == "tv_cuda" else workers
        row["workers"] = scale
        row["decode_images_per_s_all_workers"] = scale * row["decode_images_per_s"]
        row["decode_and_views_images_per_s_all_workers"] = scale * row["decode_and_views_images_per_s"]
        if step is not None:
            # augment_on=device (the preset): workers decode, the step device makes the views.
            row["ratio_decode_over_step"] = ratio(row["decode_images_per_s_all_workers"], step["images_per_s"])
            row["ratio_decode_and_views_over_step"] = ratio(row["decode_and_views_images_per_s_all_workers"],
                                                            step["images_per_s"])
    result.update(step=step, elapsed_s=round(time.perf_counter() - start, 2))
    print(write_json(finite(result), args.out))
    return 0


def cfg_overrides(args, step_batch: int, device: torch.device) -> list[str]:
    return [f"train.batch_size={step_batch}", f"device={device.type}",
            *(QUICK_STEP if args.quick else []), *args.overrides]


if __name__ == "__main__":
    sys.exit(main())
