"""What a run writes while it trains: checkpoints, metrics records (each logging step's, each
epoch's end with its online k-NN) and the final export.

Under torchrun rank 0 writes alone; every write here is collective, so that when rank 0's
fails (a full disk, mostly) every rank stops with it, instead of the others waiting for rank 0
in the next collective until the process group's timeout.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from glsd.config import to_dict
from glsd.errors import NonFiniteError, RankFailed
from glsd.export import write_run_exports
from glsd.run_layout import BACKBONE_FILE
from glsd.train import finite, lock
from glsd.train.checkpoint import export_backbone, save_checkpoint, sweep_temp_files
from glsd.train.console import fmt
from glsd.train.resume import TrainState
from glsd.train.rng import rng_state
from glsd.utils.distributed import all_reduce_mean, gather_objects, max_over_ranks, sum_over_ranks
from glsd.utils.io import atomic_copy
from glsd.weights import nonfinite_tensors

if TYPE_CHECKING:
    from glsd.train.objective import LossTerms
    from glsd.train.pretrain import Context


def written_by_rank0(ctx: "Context", write: Callable[[], None], others: str) -> None:
    """``write()`` on rank 0, its failure raised on every rank: rank 0's own error there, a
    :class:`RankFailed` saying ``others`` elsewhere. Collective under torchrun."""
    raise_on_every_rank(ctx, attempt(write) if ctx.dinfo.is_main else None, others)


def attempt(write: Callable[[], None]) -> Optional[BaseException]:
    """``write()``; the exception it raised, if any (for :func:`raise_on_every_rank`)."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - re-raised by raise_on_every_rank, on every rank
        return e
    return None


def raise_on_every_rank(ctx: "Context", failure: Optional[BaseException], others: str) -> None:
    """Raise ``failure`` where it happened and :class:`RankFailed` (``others``) on the other
    ranks, when any rank failed. Collective under torchrun."""
    if ctx.dinfo.enabled and max_over_ranks(float(failure is not None), ctx.device):
        raise failure if failure is not None else RankFailed(others)
    if failure is not None:
        raise failure


def log_metrics(ctx: "Context", record: dict) -> None:
    """One metrics.jsonl record (collective under torchrun). Every rank calls the run folder's
    ``log_metrics``, which writes on rank 0 only."""
    raise_on_every_rank(ctx, attempt(lambda: ctx.run.log_metrics(record)),
                        "rank 0 could not write metrics.jsonl (its message says why); every rank stops")


def take_unnamed(ctx: "Context") -> list:
    """This rank's skipped files that train.log has not named yet (rank 0 names its own)."""
    unnamed, ctx.run.unnamed = ctx.run.unnamed, []
    return unnamed


def name_unreadable_of_ranks(ctx: "Context", per_rank: list) -> None:
    """Rank 0 names the other ranks' skipped files (gathered at a log step or a checkpoint,
    the last of which every stop writes)."""
    if not ctx.dinfo.is_main:
        return
    for files in per_rank[1:]:
        ctx.run.name_unreadable(files)


def checkpoint(ctx: "Context", state: TrainState, keep: bool = False) -> None:
    """``last.pt`` (and ``epochNNNN.pt`` with ``keep``) of the state now; refused for
    non-finite weights. ``state.checkpoint_step`` moves only once it is written."""
    # Every rank's own RNG and skip count (collective: all ranks checkpoint at the same step),
    # so a resume gives each rank its own drop-path and augmentation streams back.
    states = {"student": ctx.student.state_dict(), "teacher": ctx.teacher.state_dict(),
              "objective": ctx.objective.state_dict()}
    bad = nonfinite_tensors(states)  # identical on every rank: all stop together
    if bad:
        error = finite.weights_error(state.step, bad, sum(len(v) for v in states.values()))
        raise nonfinite_told(ctx, state, error)
    per_rank = gather_objects({"rng": rng_state(), "skipped_images": state.skipped_images,
                               "unnamed": take_unnamed(ctx)})
    name_unreadable_of_ranks(ctx, [p["unnamed"] for p in per_rank])
    written_by_rank0(ctx, lambda: _write_checkpoint(ctx, state, states, per_rank, keep),
                     "rank 0 could not write the checkpoint (its message says why); every rank stops")
    state.checkpoint_step = state.step


def _write_checkpoint(ctx: "Context", state: TrainState, states: dict, per_rank: list, keep: bool) -> None:
    payload = {
        "config": to_dict(ctx.cfg),
        **states,  # student, teacher, objective (both centres)
        "optimizer": ctx.optimizer.state_dict(), "scaler": ctx.scaler.state_dict(),
        "step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        "planned_steps": ctx.planned_steps,  # where this run stops: evaluation says if it has
        "samples_in_epoch": state.step_in_epoch * ctx.sampler.global_batch,
        "global_batch": ctx.sampler.global_batch,
        "order_rule": ctx.sampler.order_rule,
        "skipped_images": state.skipped_images,
        "rng": per_rank[0]["rng"],
        "rng_per_rank": [p["rng"] for p in per_rank],
        "skipped_per_rank": [p["skipped_images"] for p in per_rank],
    }
    lock.check_owned(ctx.run.root)  # taken over while this process was suspended: no write
    save_checkpoint(ctx.run.last, payload)
    if keep:  # a kill before this is written: the resume copies last.pt here (restore_kept_copy)
        atomic_copy(ctx.run.last, kept_copy(ctx, state.epoch))


def kept_copy(ctx: "Context", epoch: int) -> Path:
    return ctx.run.checkpoints / f"epoch{epoch:04d}.pt"


def restore_kept_copy(ctx: "Context", state: TrainState) -> None:
    """A resume from the checkpoint of an epoch's end whose kept copy (``epochNNNN.pt``) a kill
    prevented: last.pt holds exactly that state, so it is copied there (rank 0)."""
    every = ctx.cfg.train.checkpoint_every_epochs
    due = (every and state.epoch > 0 and state.step_in_epoch == 0 and state.epoch % every == 0
           and state.checkpoint_step == state.step)
    if not (due and ctx.dinfo.is_main and ctx.run.last.is_file()):
        return
    target = kept_copy(ctx, state.epoch)
    if not target.is_file():
        atomic_copy(ctx.run.last, target)


def export_teacher(ctx: "Context") -> None:
    """The teacher backbone: ``backbone.safetensors`` and ``export/timm/`` (collective)."""
    def write() -> None:
        model = ctx.teacher.backbone.model
        export_backbone(ctx.run.root / BACKBONE_FILE, model, to_dict(ctx.cfg))
        write_run_exports(ctx.run.root, model, ctx.cfg)  # + export/timm/, files 0644
        sweep_temp_files(ctx.run.root)

    written_by_rank0(ctx, write, f"rank 0 could not write the export (its message says why); the run "
                                 f"is trained and checkpointed: `glsd export {ctx.run.root}` writes it")


def nonfinite_told(ctx: "Context", state: TrainState, error: NonFiniteError) -> NonFiniteError:
    """``error`` with what the run kept, how a rerun continues and what to change."""
    kept = finite.kept_note(ctx.run.last, state.checkpoint_step)
    if state.checkpoint_step is not None:
        largest = finite.largest_weight(ctx.student.parameters())
        grown = (f" (the student's weights have grown to |w| = {largest:.3g}: the run diverged "
                 "before the loss did, maybe before its checkpoint)" if largest > finite.GROWN_WEIGHT else "")
        kept = (f"The checkpoint {ctx.run.last} (step {state.checkpoint_step}, finite weights) is kept. "
                "A rerun as it is resumes from it and replays the same batches: continue from it "
                "under a lower train.lr with train.extend=true, or start over with "
                f"train.resume=false{grown}.")
    how = finite.advice(error.cause, ctx.cfg.train.lr, float(ctx.sched.lr.max()), ctx.cfg.train.clip_grad,
                        ctx.amp_dtype is not None)
    return NonFiniteError(f"{error} {kept} {how}", cause=error.cause)


def log_step(ctx: "Context", state: TrainState, terms: "LossTerms", steps_per_sec: float) -> None:
    """The metrics record of a logging step (the global batch's values under torchrun): to
    metrics.jsonl, the other sinks and the console, with the collapse monitor's warning."""
    sched, step = ctx.sched, state.step - 1
    values = terms.as_floats()
    if ctx.dinfo.enabled:  # the global batch's values (mean over ranks), the same on every rank
        mean = all_reduce_mean(torch.tensor(list(values.values()), dtype=torch.float64, device=ctx.device))
        values = dict(zip(values, mean.tolist()))
        name_unreadable_of_ranks(ctx, gather_objects(take_unnamed(ctx)))
    record = {"step": state.step, "epoch": state.epoch + state.step_in_epoch / ctx.sampler.steps_per_epoch,
              **values,
              "lr": float(sched.lr[step]), "wd": float(sched.wd[step]),
              "momentum": float(sched.momentum[step]), "teacher_temp": float(sched.teacher_temp[step]),
              "images_per_sec": steps_per_sec * ctx.sampler.global_batch,
              "skipped_images": int(sum_over_ranks(state.skipped_images, ctx.device))}
    log_metrics(ctx, record)
    for sink in ctx.sinks:
        sink.write(record)
    if ctx.console is not None:
        ctx.console.log(record)
        warning = ctx.monitor.update(record) if ctx.monitor is not None else None
        if warning:
            ctx.console.warn(warning)


def end_of_epoch(ctx: "Context", state: TrainState) -> None:
    """An epoch's end: its checkpoint (and kept copy), then its online k-NN."""
    every, every_steps = ctx.cfg.train.checkpoint_every_epochs, ctx.cfg.train.checkpoint_every_steps
    keep = bool(every) and state.epoch % every == 0
    # With a step interval, last.pt follows it across epoch ends (the loop leaves an epoch's
    # last step to this): epochs of a few steps (a small subset) would otherwise write the
    # whole state every few seconds, and a resume is exact from any step.
    if keep or not every_steps or state.step % every_steps == 0:
        checkpoint(ctx, state, keep=keep)
    k_every = ctx.cfg.eval.every_epochs
    if k_every and state.epoch % k_every == 0:
        from glsd.eval.online import online_knn

        # A resume restores the RNG state its checkpoint holds; the evaluation's loaders draw
        # seeds from the RNG, so they draw from a fork, or a resumed run would diverge.
        with torch.random.fork_rng(devices=[]):
            # the keys in memory, not the run folder's subset.json: a rank on a node that
            # does not share output_dir would read none there and score the whole split
            result = online_knn(ctx.teacher.backbone, ctx.cfg, ctx.device, ctx.train_keys)
        log_metrics(ctx, {"step": state.step, "epoch": state.epoch,
                             **{f"knn_{k}": v for k, v in result.items()}})
        if ctx.console is not None:
            ctx.console.lines([f"epoch {state.epoch} online k-NN: "
                               + ", ".join(f"{k} {fmt(v)}" for k, v in result.items())])
