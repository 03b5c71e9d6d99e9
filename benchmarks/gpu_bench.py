#!/usr/bin/env python
"""Training-step throughput on one GPU at a paper-like configuration: none vs geometric.

The ``imagenet-swin-t`` preset: Swin-T (window 7) or ViT-S/16, 2 x 224 px global + 8 x 96 px
local crops, DINO heads of 65536 prototypes (global and local); at batch 64, bf16 autocast, batched device augmentation
from uint8 images already on the GPU (``data.augment_on=device``; disk decoding excluded).
Each matching mode is warmed up, then the modes are timed step by step in turn.

Run it through ``benchmarks/gpu_bench.sh`` (names the output after the GPU). ``--tiny`` runs the
same code path with a tiny model on any device (the tests run it on a CPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from glsd.tools.bench import environment, write_json  # noqa: E402
from glsd.tools.bench.common import finite  # noqa: E402
from glsd.tools.bench.device import PAPER_MODELS, PAPER_PRESET, PAPER_STEP, bench_device_step  # noqa: E402


def tiny_step() -> list[str]:
    """The tests' tiny stand-in for the paper step (same code path, seconds on a CPU)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_tiny import TINY_DEVICE_STEP

    return list(TINY_DEVICE_STEP)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    ap.add_argument("--out", help="write the JSON here (gpu_bench.sh: benchmarks/results/gpu-bench-<device>.json)")
    ap.add_argument("--model", choices=sorted(PAPER_MODELS), default="swin_t",
                    help=f"the {PAPER_PRESET} preset's Swin-T, or a ViT-S/16 in its place")
    ap.add_argument("--batch", type=int, help="images per step (default 64; --tiny: 4)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per mode")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--modes", default="none,geometric", help="comma-separated matching modes")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model and crops (checks the code path, any device)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible (use --device cpu --tiny to check the code path)",
              file=sys.stderr)
        return 1
    start = time.perf_counter()
    preset = None if args.tiny else PAPER_PRESET
    overrides = tiny_step() if args.tiny else [*PAPER_STEP, *PAPER_MODELS[args.model]]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    overrides += [f"device={device.type}", *args.overrides]
    modes = [m for m in args.modes.split(",") if m]
    result = bench_device_step(preset, overrides, device, args.warmup, args.steps, modes)
    result = {"schema": "glsd-gpu-bench/1", "model": "tiny" if args.tiny else args.model,
              "env": environment(device), **result,
              "elapsed_s": round(time.perf_counter() - start, 2)}
    print(write_json(finite(result), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
