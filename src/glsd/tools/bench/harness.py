"""The real training step on a fixed batch, built by pretraining's own builders.

:func:`build_harness` calls :func:`glsd.models.heads.build_networks` and
:func:`glsd.train.optim.build_optimisation` (what ``glsd pretrain`` runs), then times
:func:`glsd.train.pretrain.train_step`. The matching is timed on its own: a forward pre-hook on
the objective keeps the first step's inputs, and :meth:`GlobalLocalObjective.match` is then run
alone on them (nothing of the objective is replaced).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import torch

from glsd.config import Config, apply_overrides
from glsd.tools.bench.common import median, ratio, sync


@dataclasses.dataclass
class StepHarness:
    name: str
    ctx: Any  # glsd.train.pretrain.Context
    batch: Any
    step0: int
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    match_seconds: list[float] = dataclasses.field(default_factory=list)
    calls: int = 0
    match_inputs: Optional[tuple] = None  # (student outputs, teacher output, geometry)

    def step(self, timed: bool = True) -> None:
        from glsd.train.pretrain import train_step

        ctx = self.ctx
        step = min(self.step0 + self.calls, ctx.sched.total_steps - 1)
        self.calls += 1
        t = time.perf_counter()
        train_step(ctx, self.batch, step, want_stats=False)
        sync(ctx.device)
        if timed:
            self.step_seconds.append(time.perf_counter() - t)

    def keep_match_inputs(self) -> None:
        """Keep the objective's inputs of the next step (detached), for :meth:`time_match`."""
        def hook(module, args, kwargs):
            student, teacher, geometry = args[:3]
            self.match_inputs = ([_detached(g) for g in student], _detached(teacher[0]), geometry)
            handle.remove()

        handle = self.ctx.objective.register_forward_pre_hook(hook, with_kwargs=True)

    def time_match(self, reps: int) -> None:
        """Seconds of the matching a plain (non-logging) step does: none without a local
        loss, else one :meth:`GlobalLocalObjective.match` call without diagnostics."""
        objective = self.ctx.objective
        if objective.local_loss is None:
            self.match_seconds = [0.0] * reps
            return
        if self.match_inputs is None:
            raise RuntimeError(f"{self.name}: no step ran since keep_match_inputs()")
        student, teacher, geometry = self.match_inputs
        device = self.ctx.device
        self.match_seconds = []
        for _ in range(reps + 1):  # the first is a warm-up
            sync(device)
            t = time.perf_counter()
            objective.match(student, teacher, geometry, diagnostics=False)
            sync(device)
            self.match_seconds.append(time.perf_counter() - t)
        self.match_seconds = self.match_seconds[1:]

    def summary(self) -> dict:
        batch = self.ctx.cfg.train.batch_size
        step_s, match_s = median(self.step_seconds), median(self.match_seconds)
        return {"images_per_s": ratio(batch, step_s), "step_ms": 1e3 * step_s,
                "step_ms_all": [round(1e3 * s, 2) for s in self.step_seconds],
                "match_ms": 1e3 * match_s, "match_share": ratio(match_s, step_s)}


def _detached(out):
    """A ViewGroupOutput whose tensors hold no autograd graph (it would keep activations)."""
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return type(out)(**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def has_conv(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def build_harness(name: str, cfg: Config, device: torch.device, batch, *, fused_adamw: bool = False,
                  compile_model: bool = False, steps_per_epoch: int = 100) -> StepHarness:
    """The training step exactly as pretraining builds it, plus two levers it does not use
    (fused AdamW, torch.compile of the backbones)."""
    from glsd.data.loader import StepViews
    from glsd.utils.distributed import DistInfo
    from glsd.train.optim import build_optimisation, param_groups
    from glsd.models.heads import build_networks
    from glsd.train.pretrain import Context
    from glsd.train.schedules import Schedules

    torch.manual_seed(cfg.train.seed)
    opt = build_optimisation(cfg, *build_networks(cfg, device), device)
    student, teacher = opt.student, opt.teacher
    if compile_model:  # the backbones only (heads and loss stay eager)
        student.backbone = torch.compile(student.backbone)
        teacher.backbone = torch.compile(teacher.backbone)
    optimizer = opt.optimizer
    if fused_adamw:
        optimizer = torch.optim.AdamW(param_groups(student, cfg.train.decay_weightnorm_magnitude),
                                      lr=0.0, fused=True)
    sched = Schedules(cfg, steps_per_epoch, cfg.train.batch_size)
    ctx = Context(cfg=cfg, run=None, dinfo=DistInfo(), device=device, amp_dtype=opt.amp_dtype,
                  model=student, student=student, teacher=teacher, objective=opt.objective,
                  optimizer=optimizer, scaler=opt.scaler, sched=sched, loader=None, sampler=None,
                  make_views=StepViews(cfg))
    step0 = min(sched.freeze_last_layer_steps, sched.total_steps - 1)  # last layer trains
    harness = StepHarness(name, ctx, batch, step0)
    harness.keep_match_inputs()
    return harness


def run_interleaved(harnesses: Sequence[StepHarness], warmup: int, reps: int) -> None:
    """Warm every harness up, time one step of each in turn, ``reps`` rounds, then time
    each harness's matching alone."""
    for h in harnesses:
        for _ in range(warmup):
            h.step(timed=False)
    for r in range(reps):  # the order rotates: no arm always follows the same one
        for k in range(len(harnesses)):
            harnesses[(r + k) % len(harnesses)].step()
    for h in harnesses:
        h.time_match(reps)


def count_step_flops(harness: StepHarness) -> int:
    """FLOPs of one training step (teacher forward, student forward + backward, losses)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        harness.step(timed=False)
    return int(counter.get_total_flops())


def first_batch(cfg: Config):
    """One batch of the config's data, views made (no workers)."""
    from glsd.data.loader import build_loader
    from glsd.data.subset import select_images

    one = apply_overrides(cfg, ["data.num_workers=0", "data.augment_on=cpu"])
    subset = select_images(one, None)
    return next(iter(build_loader(one, subset, 0, 1, pin_memory=False)[0]))
