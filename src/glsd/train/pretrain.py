"""Pretraining: one loop that reads top to bottom, alone or under torchrun.

images -> multi-crop views + geometry (data.loader) -> student / teacher (models.heads)
-> matching + losses (train.objective) -> AdamW step -> EMA teacher -> run folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from glsd.config import Config, with_absolute_paths
from glsd.data.loader import StepViews, build_loader
from glsd.data.subset import SUBSET_FILE, select_images, write_subset
from glsd.data.download import open_source_downloading_once
from glsd.data.view_params import sample_seed
from glsd.data.workers import is_worker_death, worker_died
from glsd.models.families import GLSD_CONVNET
from glsd.models.heads import GLSDNet, build_networks
from glsd.errors import DataError, NonFiniteError, TrainingInterrupted, is_out_of_memory
from glsd.run_layout import BACKBONE_FILE
from glsd.train import finite
from glsd.train.checkpoint import MAP_CHECKPOINTS
from glsd.train.finite import out_of_memory
from glsd.train.collapse import CollapseMonitor, collapse_indicators
from glsd.train.console import Console, start_summary
from glsd.utils.distributed import (DistInfo, barrier, cleanup, init_distributed, max_over_ranks,
                                    sum_over_ranks)
from glsd.train.objective import GlobalLocalObjective, LossTerms
from glsd.train.optim import (apply_schedule, build_optimisation, clip_gradients, drop_prototype_grads,
                              ema_update)
from glsd.train.preflight import preflight
from glsd.train.process_state import caller_state_kept
from glsd.train.run_folder import LOG, RunFolder
from glsd.train.tensorboard import metric_sinks, require_sinks
from glsd.train.resume import TrainState, require_one_checkpoint, restore
from glsd.train.rng import seed_everything
from glsd.train.saving import (checkpoint, end_of_epoch, export_teacher, log_step, nonfinite_told,
                               restore_kept_copy)
from glsd.train.schedules import Schedules
from glsd.train.signals import StopRequested, note_late_stop
from glsd.utils.device import device_type, resolve_device


__all__ = ["pretrain", "TrainingInterrupted"]


def pretrain(cfg: Config) -> Path:
    """Train (or resume) the run of ``cfg``; its folder. The process-wide state a run sets (the
    random generators it seeds, deterministic algorithms, the "glsd" logger's level, the
    current GPU) is the caller's again once the last run of the process has ended."""
    with caller_state_kept():
        return _locked_run(with_absolute_paths(cfg))


def _locked_run(cfg: Config) -> Path:
    dinfo = init_distributed(device_type(cfg.device))
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # one GPU per rank; alone, the one asked for (cuda:1), by index
        index = dinfo.local_rank if dinfo.enabled else device.index
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        torch.cuda.set_device(device)  # the current device: its random state is the one saved
    # Locked before anything is read or written there (rank 0; the other ranks share it).
    folder = RunFolder(cfg.output_dir, dinfo.is_main)
    try:
        folder.take_lock()
        return _pretrain(cfg, device, dinfo, folder)
    except Exception as e:  # (a signal's TrainingInterrupted is a BaseException: not failed)
        folder.mark_failed(e)
        raise
    finally:
        folder.close()  # on errors too: no train.log handler or lock left behind
        cleanup()


def _pretrain(cfg: Config, device: torch.device, dinfo: DistInfo, run: RunFolder) -> Path:
    """The run in ``run`` (locked by the caller, who closes it however this ends)."""
    ctx, state = _build_run(cfg, device, dinfo, run)
    try:
        with StopRequested() as stop:
            finished = train_loop(ctx, state, stop)
            if finished:  # a signal now waits for the export (seconds): the run is trained
                _finish_run(ctx, state)
                if stop.signal is not None:
                    note_late_stop(stop.signal)
    except RuntimeError as e:  # torch's SIGCHLD handler raises it wherever the loop was
        if not is_worker_death(e):
            raise
        raise worker_died(e, _save_for_a_dead_worker(ctx, state)) from None
    finally:
        ctx.console.close()
        for sink in ctx.sinks:
            sink.close()
    if not finished:
        signum = stop.signal or signal.SIGTERM
        raise TrainingInterrupted(
            f"stopped by signal {int(signum)} ({signal.Signals(signum).name}) after step "
            f"{state.step}; checkpoint saved in {run.last}. Rerun the same command to resume; "
            f"`glsd export {run.root}` writes this checkpoint's backbone meanwhile.",
            signum)
    return run.root


def _build_run(cfg: Config, device: torch.device, dinfo: DistInfo,
               run: RunFolder) -> tuple["Context", TrainState]:
    """Everything checked, built and restored before the first step; the start summary said."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # same initial weights on every rank
    # Bad data paths and unknown backbones fail here, before the run folder is touched.
    source = open_source_downloading_once(cfg.data, dinfo)
    # Grids, strides, warm-up and schedule changes: refused or adjusted before any step.
    cfg, plan = preflight(cfg, source, dinfo.world_size)
    require_sinks(cfg)
    student, teacher = build_networks(cfg, device, initial_weights=not (cfg.train.resume and run.last.is_file()))
    try:
        # mapped onto a GPU: every tensor is copied to the device, none keeps the file mapped
        resume, failure = run.prepare(cfg, map_checkpoint=MAP_CHECKPOINTS and device.type == "cuda"), None
    except Exception as e:  # noqa: BLE001 - on rank 0 alone (it alone checks and writes the folder)
        resume, failure = None, e
    require_one_checkpoint(resume, failure)
    barrier()  # rank 0 may have archived an old run (and its subset.json): read after that
    subset = select_images(cfg, run.root, source)
    if dinfo.is_main:
        write_subset(run.root / SUBSET_FILE, subset, cfg.data.split)
    # One batch type: the views come made by the workers or are made on the device
    # (data.augment_on), from the same drawn parameters.
    loader, sampler = build_loader(cfg, subset, dinfo.rank, dinfo.world_size,
                                   pin_memory=device.type == "cuda")

    if dinfo.rank:  # from here on each rank draws its own random numbers (drop-path masks)
        seed_everything(sample_seed("rank", cfg.train.seed, dinfo.rank), cfg.train.deterministic)
    opt = build_optimisation(cfg, student, teacher, device, dinfo.enabled)
    sched = Schedules(cfg, sampler.steps_per_epoch, sampler.global_batch)
    state = TrainState()
    if resume is not None:
        state = restore(resume, opt.student, opt.teacher, opt.objective, opt.optimizer, opt.scaler, sampler)
    console = Console(dinfo.is_main, cfg.train.progress)
    console.lines(start_summary(cfg, source, plan, device, opt.amp_dtype, dinfo.world_size,
                                run.root, state.step if resume is not None else None,
                                state.skipped_images))
    ctx = Context(
        cfg=cfg, run=run, dinfo=dinfo, device=device, amp_dtype=opt.amp_dtype,
        model=DistributedDataParallel(opt.student) if dinfo.enabled else opt.student,
        student=opt.student, teacher=opt.teacher, objective=opt.objective,
        optimizer=opt.optimizer, scaler=opt.scaler, sched=sched, loader=loader, sampler=sampler,
        make_views=StepViews(cfg), console=console, train_keys=list(subset.keys),
        monitor=CollapseMonitor(cfg.model.out_dim, cfg.log.collapse_patience,
                                max(sched.warmup_steps, sched.freeze_last_layer_steps)),
        # the checkpoint's own step, as metrics.jsonl drops what was logged after it (under
        # another global batch state.step is re-counted in the new batches: another unit)
        sinks=metric_sinks(cfg, run.root, dinfo.is_main, resume["step"] if resume is not None else 0))
    return ctx, state


def _finish_run(ctx: "Context", state: TrainState) -> None:
    """The teacher backbone exported (rank 0) and the end summary."""
    export_teacher(ctx)
    export = ctx.run.root / BACKBONE_FILE if ctx.dinfo.is_main else None
    skipped = int(sum_over_ranks(state.skipped_images, ctx.device))
    ctx.console.end(state.step, ctx.sampler.global_batch, skipped, str(export) if export else None,
                    timm_loads_it=ctx.cfg.model.backbone != GLSD_CONVNET)


@dataclass
class Context:
    """Everything the loop touches, built once."""
    cfg: Config
    run: RunFolder
    dinfo: DistInfo
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    model: nn.Module  # the student, DDP-wrapped under torchrun
    student: GLSDNet
    teacher: GLSDNet
    objective: GlobalLocalObjective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sched: Schedules
    loader: torch.utils.data.DataLoader
    sampler: object
    make_views: StepViews  # a Batch -> views and geometry on the device
    train_keys: list = dataclasses.field(default_factory=list)  # the images it pretrains on (online k-NN)
    console: Optional[Console] = None  # None (benchmarks): silent
    monitor: Optional[CollapseMonitor] = None
    sinks: list = dataclasses.field(default_factory=list)  # metric writers besides metrics.jsonl
    applying: bool = False  # from a step's weight update until the state counts it (not a state to save)

    @property
    def planned_steps(self) -> int:
        """Where the run stops: the schedule's end, or ``train.max_steps`` before it."""
        return min(self.sched.total_steps, self.cfg.train.max_steps or self.sched.total_steps)


def train_loop(ctx: Context, state: TrainState, stop: StopRequested) -> bool:
    """Returns True when the schedule (or train.max_steps) completed, False on a signal."""
    cfg, t = ctx.cfg, ctx.cfg.train
    max_steps = ctx.planned_steps
    console = ctx.console or Console(is_main=False)
    console.begin(state.step, max_steps, cfg.train.log_every)
    restore_kept_copy(ctx, state)  # a kill between last.pt and its epoch's kept copy
    _close_finished_epoch(ctx, state)  # a run stopped right after an epoch's last step
    while state.step < max_steps:
        ctx.sampler.set_epoch(state.epoch, state.step_in_epoch * ctx.sampler.global_batch)
        tick, since_log, stopping, batches, steps_before = time.perf_counter(), 0, None, 0, state.step
        whole_epoch = state.step_in_epoch == 0
        for batch in ctx.loader:
            batches += 1
            ctx.run.name_unreadable(batch.unreadable)
            if _no_image(ctx, batch):  # data.on_error=skip dropped every image of the batch
                state.step_in_epoch += 1
                state.skipped_images += batch.skipped
                continue
            is_log_step = (state.step + 1) % t.log_every == 0 or state.step + 1 == max_steps
            terms = checked_step(ctx, state, batch, is_log_step)
            state.step += 1
            state.step_in_epoch += 1
            state.skipped_images += batch.skipped
            ctx.applying = False  # the weights and the state's count agree again
            since_log += 1
            console.update(state.step, terms.loss_value, float(ctx.sched.lr[state.step - 1]),
                           ctx.sampler.global_batch)
            if is_log_step:
                elapsed = time.perf_counter() - tick
                log_step(ctx, state, terms, since_log / max(elapsed, 1e-9))
                tick, since_log = time.perf_counter(), 0
            # Under torchrun a signal may reach the ranks at different steps: all stop at once.
            stopping = stop.signal if not ctx.dinfo.enabled else (
                int(max_over_ranks(stop.signal or 0, ctx.device)) or None)
            if stopping is not None or state.step >= max_steps:
                break
            if (cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0
                    and state.step_in_epoch < ctx.sampler.steps_per_epoch):  # else the epoch's end saves
                checkpoint(ctx, state)
        if stopping is not None:
            checkpoint(ctx, state)
            LOG.warning("signal %d: stopped after step %d; checkpoint written, rerun to resume",
                        stopping, state.step)
            console.close()
            stop.signal = stopping  # the CLI prints the one message (TrainingInterrupted)
            return False
        if whole_epoch and batches and state.step == steps_before:
            raise DataError(f"no image of {ctx.sampler.n} could be read in epoch {state.epoch} "
                            f"(data.on_error=skip skipped them all); check data.root")
        _close_finished_epoch(ctx, state)
    if state.checkpoint_step != state.step:  # the last epoch's end has saved this step
        checkpoint(ctx, state)
    console.close()
    return True


def _close_finished_epoch(ctx: Context, state: TrainState) -> None:
    """After an epoch's last step: the next epoch, and the epoch's checkpoint (and online k-NN)."""
    if state.step_in_epoch >= ctx.sampler.steps_per_epoch:
        state.epoch += 1
        state.step_in_epoch = 0
        end_of_epoch(ctx, state)


def _no_image(ctx: Context, batch) -> bool:
    """The batch lost every image to bad files; under torchrun, any rank's did (all ranks
    skip the step together, or the others would wait for it in backward())."""
    empty = len(batch.indices) == 0
    if not ctx.dinfo.enabled:
        return empty
    return bool(max_over_ranks(float(empty), ctx.device))


def train_step(ctx: Context, batch, step: int, want_stats: bool = True) -> LossTerms:
    """One optimisation step (``step`` counts from 0), the data flow in order:

    1. views: the batch's ``Vg`` global then ``Vl`` local crops, each ``(B, 3, S, S)``, and
       their crop records ``(V, B, 5)`` (where each came from in the original image);
    2. the teacher (no gradient) on the global views and the student on every view, under
       autocast: per group of views of one size, view-level logits ``(V, B, K)`` and cell
       logits ``(V, B, gh*gw, K_local)``;
    3. the objective: global loss, matching and local loss (fp32), at this step's teacher
       temperature; collapse indicators first when ``want_stats`` (the centre they read is the
       one the targets were made with);
    4. backward, gradient clipping and the non-finite guard, the frozen prototypes of the
       first steps, AdamW at this step's learning rate and weight decay, then the EMA teacher.

    Returns the loss terms (``loss_value`` on the host; ``diagnostics`` when ``want_stats``).
    Raises NonFiniteError before anything of a non-finite step is applied.
    """
    cfg, sched = ctx.cfg, ctx.sched
    n_global = cfg.crops.num_global
    views, geometry = ctx.make_views(batch, ctx.device)
    if cfg.model.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    apply_schedule(ctx.optimizer, sched, step)
    autocast = (torch.autocast(ctx.device.type, dtype=ctx.amp_dtype) if ctx.amp_dtype
                else contextlib.nullcontext())
    with autocast:
        with torch.no_grad():
            teacher_out = ctx.teacher(views[:n_global])
        student_out = ctx.model(views)
    # Losses in fp32: softmax over thousands of prototypes and their cross-entropy lose
    # the small differences that carry the signal when rounded to bf16.
    collapse = {}
    if want_stats:  # before the objective: with the centre the teacher targets were made with
        collapse = collapse_indicators(teacher_out[0].global_logits, ctx.objective.global_loss.center.center,
                                       float(sched.teacher_temp[step]), teacher_out[0].global_feat)
    terms = ctx.objective(student_out, teacher_out, geometry, float(sched.teacher_temp[step]),
                          diagnostics=want_stats)
    terms.diagnostics.update(collapse)
    terms.loss_value = finite.check_loss(terms, step + 1, ctx.dinfo.enabled)
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(terms.loss).backward()
    ctx.scaler.unscale_(ctx.optimizer)
    if cfg.train.clip_grad:
        norm = clip_gradients(ctx.student.parameters(), cfg.train.clip_grad, cfg.train.clip_grad_mode)
    else:
        norm = finite.grad_norm(ctx.student.parameters())
    # fp16's scaler skips steps with inf gradients by design; otherwise they would be applied.
    # Gradients are all-reduced, so every rank sees the same norm and stops together.
    if not ctx.scaler.is_enabled() and not bool(torch.isfinite(norm)):
        raise finite.grad_error(step + 1, float(norm))
    if step < sched.freeze_last_layer_steps:
        drop_prototype_grads(ctx.student)
    ctx.applying = True  # until the loop counts the step (a dead worker's save waits for it)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ema_update(ctx.teacher, ctx.student, float(sched.momentum[step]))
    return terms


def checked_step(ctx: Context, state: TrainState, batch, want_stats: bool) -> LossTerms:
    """:func:`train_step`, its failures told as what went wrong, what to change and what the
    run kept: a non-finite loss or gradient, running out of memory."""
    try:
        return train_step(ctx, batch, state.step, want_stats)
    except NonFiniteError as e:  # nothing of this step was applied or written
        raise nonfinite_told(ctx, state, e) from None
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(ctx.cfg, ctx.amp_dtype, ctx.device, state.step + 1,
                            ctx.run.last, state.checkpoint_step, e) from None


def _save_for_a_dead_worker(ctx: Context, state: TrainState) -> str:
    """A checkpoint of the weights of the last counted step, unless the news came during the
    weight update (the weights would be a step ahead of the count). Torch raises it wherever
    the trainer is: in a step's forward or backward, the step has already moved BatchNorm's
    statistics, the centres and the random state one batch on, and the checkpoint keeps them
    so. The resume repeats that batch from there: a valid run, not bit for bit the one an
    uninterrupted run would have made, and hours of steps are not thrown away for that."""
    kept = finite.kept_note(ctx.run.last, state.checkpoint_step)
    if ctx.dinfo.enabled:  # the checkpoint is collective: one rank cannot save alone
        return f"no checkpoint written (under torchrun one rank cannot save alone). {kept}"
    if ctx.applying:
        return f"no checkpoint written (it came during a weight update). {kept}"
    checkpoint(ctx, state)
    return f"checkpoint written at step {state.step}: rerun the command to resume"
