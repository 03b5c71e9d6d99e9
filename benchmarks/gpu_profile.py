#!/usr/bin/env python
"""Where a paper-like training step spends its GPU time: torch.profiler tables for a few steps.

Swin-T, 2 x 224 + 8 x 96 crops, bf16, device augmentation (the ``gpu_bench.py`` setting), one
matching mode; warm-up steps first, then ``--steps`` profiled steps, sorted by CUDA time and
by CPU time.   PYTHONPATH=src python benchmarks/gpu_profile.py --batch 128 > profile.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from glsd.config import load_config  # noqa: E402
from glsd.tools.bench.device import PAPER_PRESET, PAPER_STEP, device_batch  # noqa: E402
from glsd.tools.bench.harness import build_harness  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--mode", default="geometric", choices=["none", "similarity", "geometric"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device visible", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    cfg = load_config(PAPER_PRESET, [*PAPER_STEP, f"train.batch_size={args.batch}", "device=cuda",
                                      f"loss.matching={args.mode}"])
    raw = device_batch(cfg, dev, (375, 500))  # views made on the device in each step
    b = cfg.train.batch_size
    h = build_harness(args.mode, cfg, dev, raw, steps_per_epoch=1000)
    for _ in range(args.warmup):
        h.step(timed=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            h.step(timed=False)
        torch.cuda.synchronize()
    print(f"# {torch.cuda.get_device_name(dev)}, {args.mode}, batch {b}, {args.steps} steps")
    for key in ("cuda_time_total", "cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
