"""Where a resumed run goes on: its state restored from a checkpoint (weights, optimizer,
loss scaler, each rank's random state) and its position re-counted in this run's batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from glsd.config import ConfigError
from glsd.errors import CheckpointError
from glsd.utils.distributed import gather_objects
from glsd.data.loader import ORDER_RULES
from glsd.train.rng import restore_rank_rng
from glsd.train.run_folder import LOG
from glsd.weights import check_weights


@dataclass
class TrainState:
    step: int = 0  # optimisation steps done
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_images: int = 0
    checkpoint_step: Optional[int] = None  # step of the last checkpoint on disk


def require_one_checkpoint(ckpt: Optional[dict], failure: Optional[BaseException] = None) -> None:
    """Every rank resumes the same checkpoint, or every rank starts fresh (collective).

    Each rank reads ``output_dir`` on its own file system: nodes that do not share it would
    find different checkpoints (or none) and run different schedules until a collective hangs.
    ``failure``: this rank's error in preparing the run folder (rank 0 alone checks and writes
    it), raised here on every rank, so that none waits for a rank that has stopped.
    """
    seen = gather_objects((None if ckpt is None else int(ckpt["step"]),
                           None if failure is None else str(failure)))
    failed = [(rank, error) for rank, (_, error) in enumerate(seen) if error is not None]
    if failure is not None:
        raise failure
    if failed:
        rank, error = failed[0]
        raise ConfigError(f"rank {rank} could not prepare the run folder: {error}")
    steps = [step for step, _ in seen]
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {rank}: {'none' if step is None else f'step {step}'}"
                          for rank, step in enumerate(steps))
        raise ConfigError(f"the processes found different checkpoints in output_dir ({found}): "
                          "every node must see the same output_dir, on a disk they share")


def restore(ckpt: dict, student, teacher, objective, optimizer, scaler, sampler) -> TrainState:
    try:
        return _restore(ckpt, student, teacher, objective, optimizer, scaler, sampler)
    except CheckpointError:
        raise  # already names the problem
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"the checkpoint to resume is corrupt or of another model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                              "start fresh with train.resume=false (it is moved aside)") from None


def _restore(ckpt: dict, student, teacher, objective, optimizer, scaler, sampler) -> TrainState:
    check_weights(ckpt["student"], student, "student weights")
    check_weights(ckpt["teacher"], teacher, "teacher weights")
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    objective.load_state_dict(ckpt["objective"])
    optimizer.load_state_dict(ckpt["optimizer"])
    own_host_tensors(optimizer)
    if ckpt["scaler"]:  # empty from a run without fp16 loss scaling: a new scaler starts fresh
        scaler.load_state_dict(ckpt["scaler"])
    skipped = restore_rank_rng(ckpt, sampler.rank, sampler.world)
    sampler.order_rule = ckpt.get("order_rule", 1)  # the epoch orders it was trained on
    if sampler.order_rule not in ORDER_RULES:
        raise CheckpointError(f"the checkpoint's epoch order rule {sampler.order_rule!r} is not one "
                              f"of this version's ({', '.join(map(str, ORDER_RULES))}); resume it with "
                              "the glsd version that wrote it, or start fresh with train.resume=false")
    if sampler.order_rule == 1:
        LOG.info("resumed under the epoch order of runs made before 2026-12-07 (seed + epoch)")
    step, step_in_epoch = resume_position(ckpt, sampler.steps_per_epoch, sampler.global_batch)
    if step == ckpt["step"]:
        LOG.info("resumed from step %d (epoch %d, step %d of it)", step, ckpt["epoch"], step_in_epoch)
    else:  # another world size (a requeued job on fewer GPUs): continue, and say what changes
        LOG.warning("resumed from step %d of batches of %d images = step %d of this run's batches of "
                    "%d (epoch %d, step %d of it): the schedules continue at the same point of the "
                    "run; the peak learning rate follows the global batch (train.lr x batch / 256: x%.3g), "
                    "and step-counted warm-ups count this run's batches",
                    ckpt["step"], recorded_global_batch(ckpt), step, sampler.global_batch,
                    ckpt["epoch"], step_in_epoch, sampler.global_batch / recorded_global_batch(ckpt))
    return TrainState(step, ckpt["epoch"], step_in_epoch, skipped, step)


def own_host_tensors(optimizer) -> None:
    """Copy the optimizer state torch keeps on the host as loaded (AdamW's ``step``): from a
    memory-mapped checkpoint it would keep the whole file mapped, and its disk space held after
    the next save replaces it, for the rest of the run."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device.type == "cpu" and value.numel() == 1:
                state[key] = value.clone()


def recorded_global_batch(ckpt: dict) -> int:
    """The global batch a checkpoint was trained with (older ones: per-process batch x ranks)."""
    if "global_batch" in ckpt:
        return int(ckpt["global_batch"])
    return int(ckpt["config"]["train"]["batch_size"]) * len(ckpt.get("rng_per_rank") or [None])


def resume_position(ckpt: dict, steps_per_epoch: int, global_batch: int) -> tuple[int, int]:
    """(step, step in its epoch) at which a checkpoint resumes under this run's global batch.

    What does not depend on the global batch is the epoch and the samples consumed in it. Under
    the checkpoint's global batch the step is the checkpoint's own (exact resume). Under another
    one (another world size, or train.batch_size with train.extend=true) the step counter counts
    batches of another size, and the schedules are built per epoch: the step is re-counted in
    this run's batches, so lr, momentum and temperatures continue where the run was, and the run
    ends after its epochs. The sample position rounds down to a whole new batch (a few images may
    be seen twice).
    """
    step_in_epoch = ckpt["samples_in_epoch"] // global_batch
    if recorded_global_batch(ckpt) == global_batch:
        return ckpt["step"], step_in_epoch
    return ckpt["epoch"] * steps_per_epoch + step_in_epoch, step_in_epoch
