#!/usr/bin/env python
"""Where the local loss's extra time goes: the parts of one training step, timed by hand.

The step of ``glsd.train.pretrain.train_step`` taken apart (views, teacher forward, student
forward, matching, global loss, local loss, backward, optimizer), for the global-only and the
geometric arm of a preset, on one fixed batch of its synthetic images, arms alternated step by
step; the median of each part over ``--rounds`` steps. Wall-clock per part (a CPU runs every
op synchronously; on a GPU each mark syncs). The profiler is not used: in this sandbox it
inflates every op that writes a fresh buffer several-fold.

    python benchmarks/step_breakdown.py --preset cifar10-lowdata-cpu --out F.json
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from glsd.config import apply_overrides, load_config  # noqa: E402
from glsd.tools.bench.common import cpu_model, finite, sync, write_json  # noqa: E402
from glsd.tools.bench.harness import build_harness, first_batch  # noqa: E402


def timed_parts(ctx, batch, step: int) -> dict[str, float]:
    """One step in parts (milliseconds), in train_step's order and with its settings."""
    cfg, device = ctx.cfg, ctx.device
    parts, last = {}, time.perf_counter()

    def mark(name: str) -> None:
        nonlocal last
        sync(device)
        now = time.perf_counter()
        parts[name] = 1e3 * (now - last)
        last = now

    views, geometry = ctx.make_views(batch, device)
    if cfg.model.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    mark("views")
    autocast = (torch.autocast(device.type, dtype=ctx.amp_dtype) if ctx.amp_dtype
                else contextlib.nullcontext())
    temp = float(ctx.sched.teacher_temp[step])
    with autocast:
        with torch.no_grad():
            teacher = ctx.teacher(views[:cfg.crops.num_global])
        mark("teacher_forward")
        student = ctx.model(views)
    mark("student_forward")
    objective = ctx.objective
    if objective.local_loss is None:
        loss = objective(student, teacher, geometry, temp, diagnostics=False).loss
        mark("global_loss")
    else:
        pairs, matches, _ = objective.match(student, teacher[0], geometry, diagnostics=False)
        mark("matching")
        global_loss = objective.global_loss(torch.cat([g.global_logits for g in student]),
                                            teacher[0].global_logits, temp)
        mark("global_loss")
        local_loss = objective.local_loss([g.local_logits for g in student], teacher[0].local_logits,
                                          pairs, matches, temp)
        mark("local_loss")
        loss = objective.global_weight * global_loss + objective.local_weight * local_loss
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    mark("backward")
    ctx.optimizer.step()
    mark("optimizer")
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cifar10-lowdata-cpu")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, ["data.source=synthetic", "device=cpu"])
    batch = first_batch(cfg)
    arms = {m: build_harness(m, apply_overrides(cfg, [f"loss.matching={m}"]), torch.device("cpu"), batch)
            for m in ("none", "geometric")}
    runs = {m: [] for m in arms}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for m, h in (arms.items() if r % 2 else reversed(arms.items())):
            parts = timed_parts(h.ctx, batch, h.step0)
            if r >= 2:
                runs[m].append(parts)
    medians = {m: {k: statistics.median(p[k] for p in rs) for k in rs[0]} for m, rs in runs.items()}
    for m in medians:  # the sum of the parts' medians (not the median of the totals); clipping,
        medians[m]["total"] = sum(medians[m].values())  # EMA and the schedule are not parts
    extra = {k: medians["geometric"].get(k, 0.0) - medians["none"].get(k, 0.0) for k in medians["geometric"]}
    out = {"command": " ".join(["python", "benchmarks/step_breakdown.py", *(argv or sys.argv[1:])]),
           "preset": args.preset, "cpu": cpu_model(), "threads": torch.get_num_threads(),
           "rounds": args.rounds, "ms_median": medians, "geometric_minus_none_ms": extra}
    print(write_json(finite(out), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
