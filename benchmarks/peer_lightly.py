#!/usr/bin/env python
"""glsd's training step against lightly's DINO blocks, side by side in one process.

glsd's arm is the real step (``build_networks`` / ``build_optimisation`` / ``train_step``, via
:func:`glsd.tools.bench.harness.build_harness`). lightly's arm builds DINO from its own blocks
(``DINOProjectionHead``, ``DINOLoss``, ``update_momentum``, ``deactivate_requires_grad``) on the
same timm (or glsd conv) backbone, with the preset's crops, head sizes, precision (autocast
dtype), memory layout, AdamW (same parameter groups, foreach), gradient clipping, learning
rate, weight decay, teacher momentum and temperature. Both get the same views, made once
before timing (the data path is not what this compares). The arms are timed one step each in
turn, the order rotated every round, so a busy machine slows them alike.

Arms: ``glsd_none`` (global-only), ``lightly`` (same-size views concatenated into one backbone
call, as glsd does), ``lightly_per_view`` (one call per view, as lightly's DINO example is
written), ``glsd_geometric`` (glsd with its local loss, for reference).

    pip install 'glsd[bench]'           # lightly (only this script needs it)
    python benchmarks/peer_lightly.py --out benchmarks/results/peer-lightly-cpu.json
    python benchmarks/peer_lightly.py --quick    # smoke test: tiny sizes, 2 timed steps
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from glsd.config import Config, load_config  # noqa: E402
from glsd.tools.bench import environment, write_json  # noqa: E402
from glsd.tools.bench.common import finite, log, ratio  # noqa: E402

SCHEMA = "glsd-peer-lightly/1"
PRESETS = {"vit": "cifar10-vit-tiny", "conv": "cifar10-lowdata-cpu"}
ARMS = ("glsd_none", "lightly", "lightly_per_view", "glsd_geometric")
# --quick: the same code path on tiny networks (seconds on a CPU).
QUICK = {
    "vit": ["model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "model.out_dim=64",
            "model.hidden_dim=32", "model.bottleneck_dim=16", "model.local_out_dim=32",
            "model.local_hidden_dim=16", "crops.num_local=2"],
    "conv": ["model.backbone_kwargs={widths: [8, 8, 16, 16], pool_after: [1, 3]}", "model.out_dim=64", "model.hidden_dim=32",
             "model.bottleneck_dim=16", "model.local_out_dim=32", "model.local_hidden_dim=16",
             "model.local_bottleneck_dim=16", "crops.num_local=2"],
}


def premade_batch(cfg: Config, device: torch.device):
    """A Batch whose views are already made (the same tensors for every arm)."""
    from glsd.data.multicrop import Batch
    from glsd.data.views import ViewMaker
    from glsd.tools.bench.device import device_batch

    raw = device_batch(cfg, device, source_hw=(32, 32))
    with torch.no_grad():
        views = ViewMaker(cfg.crops)(raw.images, raw.params)
    return Batch(raw.geometry.to(device), raw.labels, raw.indices, 0, views=[v.contiguous() for v in views])


class LightlyDINO:
    """DINO written with lightly's blocks, on glsd's backbone model and glsd's schedules."""

    def __init__(self, name: str, cfg: Config, device: torch.device, sched, step0: int, per_view: bool):
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        from glsd.models.backbone import create_model
        from glsd.train.optim import param_groups
        from glsd.utils.device import resolve_precision

        m, size = cfg.model, cfg.crops.global_size
        if m.head_layers != 3:
            raise SystemExit(f"lightly's DINOProjectionHead has 3 layers; the preset has model.head_layers={m.head_layers}")
        self.name, self.cfg, self.device, self.sched, self.per_view = name, cfg, device, sched, per_view
        self.step0, self.calls, self.step_seconds = step0, 0, []
        torch.manual_seed(cfg.train.seed)

        def head():
            with warnings.catch_warnings():  # lightly uses the deprecated nn.utils.weight_norm
                warnings.simplefilter("ignore")
                return DINOProjectionHead(dim, m.hidden_dim, m.bottleneck_dim, m.out_dim,
                                          norm_last_layer=m.norm_last_layer)

        backbone = create_model(m, size)
        dim = int(backbone.num_features)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head()}).to(device)
        # As glsd's teacher (and DINO's): the same weights, no stochastic depth.
        no_drop = dataclasses.replace(m, drop_path_rate=0.0)
        self.teacher = nn.ModuleDict({"backbone": create_model(no_drop, size), "head": head()}).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        deactivate_requires_grad(self.teacher)
        if m.channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        loss = cfg.loss
        self.criterion = DINOLoss(m.out_dim, loss.warmup_teacher_temp, loss.teacher_temp,
                                  student_temp=loss.student_temp, center_momentum=loss.center_momentum).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg.train.decay_weightnorm_magnitude), lr=0.0, foreach=True)
        self.amp_dtype = resolve_precision(cfg.train.precision, device)

    def _forward(self, net: nn.ModuleDict, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-view logits ``(B, K)``: one backbone call per view, or per run of same-size views."""
        if self.per_view:
            return [net["head"](net["backbone"](v)) for v in views]
        out, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape == views[i].shape:
                j += 1
            logits = net["head"](net["backbone"](torch.cat(views[i:j])))
            out += list(logits.chunk(j - i))
            i = j
        return out

    def step(self, views: list[torch.Tensor], timed: bool = True) -> None:
        from lightly.models.utils import update_momentum

        from glsd.train.optim import apply_schedule, clip_gradients

        cfg, sched = self.cfg, self.sched
        step = min(self.step0 + self.calls, sched.total_steps - 1)
        self.calls += 1
        t = time.perf_counter()
        if cfg.model.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        apply_schedule(self.optimizer, sched, step)
        # lightly's example: EMA first, then the forward passes.
        update_momentum(self.student, self.teacher, m=float(sched.momentum[step]))
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            with torch.no_grad():
                teacher_out = self._forward(self.teacher, views[:cfg.crops.num_global])
            student_out = self._forward(self.student, views)
        # The loss in fp32, as glsd computes its own.
        loss = self.criterion([t.float() for t in teacher_out], [s.float() for s in student_out],
                              teacher_temp=float(sched.teacher_temp[step]))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.student["head"].cancel_last_layer_gradients(current_epoch=step)  # past the freeze
        if cfg.train.clip_grad:
            clip_gradients(self.student.parameters(), cfg.train.clip_grad, cfg.train.clip_grad_mode)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timed:
            self.step_seconds.append(time.perf_counter() - t)


class GlsdArm:
    """glsd's real step (the bench harness) behind the same interface as :class:`LightlyDINO`."""

    def __init__(self, name: str, cfg: Config, device: torch.device, batch):
        from glsd.tools.bench.harness import build_harness

        self.name, self.harness, self.step_seconds = name, build_harness(name, cfg, device, batch), None
        self.step_seconds = self.harness.step_seconds

    def step(self, views, timed: bool = True) -> None:
        self.harness.step(timed)


def flops_of(arm, views) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        arm.step(views, timed=False)
    return int(counter.get_total_flops())


def top_ops(arm, views, n: int) -> list[dict]:
    """The ``n`` operators of one step with the most self time (where two arms differ)."""
    from torch.profiler import profile

    with profile() as prof:
        arm.step(views, timed=False)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count} for e in rows]


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if len(xs) < 2:
        return {"median": xs[0] if xs else None, "p25": xs[0] if xs else None, "p75": xs[-1] if xs else None,
                "min": xs[0] if xs else None, "max": xs[-1] if xs else None}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": xs[0], "max": xs[-1]}


def measure(kind: str, batch_size: int, args, device: torch.device) -> dict:
    from glsd.tools.bench.harness import build_harness  # noqa: F401 - fail early if missing

    preset = PRESETS[kind]
    base = [f"train.batch_size={batch_size}", f"train.precision={args.precision}", f"device={device.type}",
            *(QUICK[kind] if args.quick else []), *args.overrides]
    cfg = load_config(preset, [*base, "loss.matching=none"])
    batch = premade_batch(cfg, device)
    arms = []
    for name in args.arms:
        if name.startswith("glsd_"):
            arms.append(GlsdArm(name, load_config(preset, [*base, f"loss.matching={name[5:]}"]), device, batch))
        else:
            ref = arms[0].harness if arms and isinstance(arms[0], GlsdArm) else None
            sched, step0 = _schedules(cfg, ref)
            arms.append(LightlyDINO(name, cfg, device, sched, step0, per_view=name == "lightly_per_view"))
    views = batch.views
    log(f"{preset} batch {batch_size}: {len(arms)} arms, {args.warmup} warm-up + {args.steps} timed steps")
    for arm in arms:
        for _ in range(args.warmup):
            arm.step(views, timed=False)
    for r in range(args.steps):
        for k in range(len(arms)):  # rotated order: no arm always runs first
            arms[(r + k) % len(arms)].step(views)
    rows = {}
    for arm in arms:
        secs = arm.step_seconds
        q = quantiles([1e3 * s for s in secs])
        rows[arm.name] = {"images_per_s": ratio(batch_size, q["median"] / 1e3), "step_ms": q,
                          "step_ms_all": [round(1e3 * s, 2) for s in secs]}
        if not args.no_flops:
            rows[arm.name]["flops_per_step"] = flops_of(arm, views)
        if args.profile_top:
            rows[arm.name]["top_ops"] = top_ops(arm, views, args.profile_top)
    out = {"preset": preset, "batch_size": batch_size, "config_overrides": base, "arms": rows,
           "views": [list(v.shape) for v in views], "ratios": {}}
    names = [a.name for a in arms]
    for g in (n for n in names if n.startswith("glsd_")):
        for p in (n for n in names if n.startswith("lightly")):
            # Paired per round: lightly's step time over glsd's (> 1: glsd is faster).
            per_round = [ls / gs for gs, ls in zip(rows[g]["step_ms_all"], rows[p]["step_ms_all"])]
            out["ratios"][f"{g}_speed_over_{p}"] = quantiles(per_round)
    return out


def _schedules(cfg: Config, ref):
    """The glsd arm's schedules and first step (same lr / wd / momentum / temperature)."""
    if ref is not None:
        return ref.ctx.sched, ref.step0
    from glsd.train.schedules import Schedules

    sched = Schedules(cfg, 100, cfg.train.batch_size)
    return sched, min(sched.freeze_last_layer_steps, sched.total_steps - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides (both arms)")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--presets", default="vit,conv", help=f"comma-separated, of {sorted(PRESETS)}")
    ap.add_argument("--batches", default="16,64,128", help="comma-separated batch sizes")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per arm")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per arm (interleaved)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count of one step per arm")
    ap.add_argument("--profile-top", type=int, default=10,
                    help="operators with the most self time in one profiled step per arm (0: none)")
    ap.add_argument("--quick", action="store_true", help="tiny networks, batch 4, 1 + 2 steps (smoke test)")
    args = ap.parse_args(argv)
    try:
        import lightly
    except ImportError:
        print("peer_lightly: lightly is not installed: pip install 'glsd[bench]' (or pip install lightly)",
              file=sys.stderr)
        return 2
    args.arms = [a for a in args.arms.split(",") if a]
    bad = sorted(set(args.arms) - set(ARMS)) + sorted(set(args.presets.split(",")) - set(PRESETS))
    if bad:
        ap.error(f"unknown arm or preset {bad}; arms: {list(ARMS)}, presets: {sorted(PRESETS)}")
    if args.quick:
        args.batches, args.warmup, args.steps = "4", 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    results = [measure(kind, int(b), args, device)
               for kind in args.presets.split(",") for b in args.batches.split(",")]
    result = {"schema": SCHEMA, "command": shlex.join(["python", "benchmarks/peer_lightly.py", *sys.argv[1:]])
              if argv is None else shlex.join(["python", "benchmarks/peer_lightly.py", *argv]),
              "quick": args.quick, "lightly": lightly.__version__, "env": environment(device),
              "warmup_steps": args.warmup, "timed_steps": args.steps, "precision": args.precision,
              "note": "step_ms quantiles over the timed steps; ratios paired per round "
                      "(lightly step time / glsd step time: > 1 means glsd is faster)",
              "results": results, "elapsed_s": round(time.perf_counter() - start, 2)}
    print(write_json(finite(result), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
