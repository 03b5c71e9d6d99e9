#!/usr/bin/env python
"""Where a CPU training step spends its time, per matching mode: torch.profiler tables.

The real ``train_step`` of a preset (default ``cpu-default``) on one fixed batch, as ``glsd
bench`` times it; warm-up steps first, then ``--steps`` profiled steps per mode, sorted by
self CPU time.   python benchmarks/cpu_profile.py --modes none,geometric > profile.txt
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

from glsd.config import apply_overrides, load_config  # noqa: E402
from glsd.tools.bench.common import cpu_model  # noqa: E402
from glsd.tools.bench.harness import build_harness, first_batch  # noqa: E402
from glsd.tools.bench.run import DEFAULT_PRESET  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--modes", default="none,geometric")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, [*args.overrides, "device=cpu"])
    batch = first_batch(cfg)
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, preset {args.preset} "
          f"{' '.join(args.overrides)}, batch {cfg.train.batch_size}, {args.steps} profiled steps per mode")
    for mode in args.modes.split(","):
        c = apply_overrides(cfg, [f"loss.matching={mode}"])
        h = build_harness(mode, c, torch.device("cpu"), batch)
        for _ in range(args.warmup):
            h.step(timed=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                h.step(timed=False)
        print(f"\n## {mode}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
