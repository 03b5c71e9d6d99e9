#!/usr/bin/env python
"""Training-step throughput on one GPU at a paper-like configuration: none vs geometric.

Swin-T (window 7) or ViT-S/16, 2 x 224 px global + 8 x 96 px local crops, DINO heads of
65536 prototypes (global and local), batch 64, bf16 autocast, batched device augmentation
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

from glsd import bench  # noqa: E402

MODELS = {"swin_t": bench.PAPER_SWIN_T, "vit_s16": bench.PAPER_VIT_S16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    ap.add_argument("--out", help="write the JSON here (gpu_bench.sh: benchmarks/results/gpu-bench-<device>.json)")
    ap.add_argument("--model", choices=sorted(MODELS), default="swin_t")
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
    overrides = list(bench.TINY_DEVICE_STEP if args.tiny else MODELS[args.model])
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    overrides += [f"device={device.type}", *args.overrides]
    modes = [m for m in args.modes.split(",") if m]
    result = bench.bench_device_step(overrides, device, args.warmup, args.steps, modes)
    result = {"schema": "glsd-gpu-bench/1", "model": "tiny" if args.tiny else args.model,
              "env": bench.environment(device), **result,
              "elapsed_s": round(time.perf_counter() - start, 2)}
    print(bench.write_json(bench._finite(result), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
