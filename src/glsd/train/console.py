"""What a run tells its user, on a terminal and off it (a log file, a SLURM job, CI).

- a start summary (data, grids, matching, device, batch, schedule, run folder, resume) on
  stderr and in train.log;
- on a terminal a progress bar with loss, lr and images/s; elsewhere (or with
  ``train.progress=false``) one line every ``train.log_every`` steps, with the time so far and
  the time left at the pace so far;
- a warning, a few steps in, when the pace puts the end of the schedule more than a day away;
- warnings (collapse, scaled warm-up) that the bar does not swallow;
- an end summary (steps, time, images/s, skipped images, export path).

Numbers are written ``%.3g`` (a learning rate of 3e-06 never reads as 0.0). Only the main
process speaks.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

LOG = logging.getLogger("glsd")

# The keys of a logged record shown on the console line, in order (the rest go to
# metrics.jsonl only); short names keep the line within a terminal width.
LINE_KEYS = (("loss", "loss"), ("loss_global", "global"), ("loss_local", "local"), ("lr", "lr"),
             ("teacher_temp", "t_temp"), ("effective_prototypes", "eff_protos"),
             ("images_per_sec", "img/s"))


def fmt(value: Any) -> str:
    """``%.3g`` for floats (3e-06, 0.0312, 412; 12,346 from 1000 on), the rest as they are."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isfinite(value) and 1000 <= abs(value) < 1e15:  # counts and rates: 12,346
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_record(record: dict, max_steps: Optional[int] = None) -> str:
    """``step 10/120 epoch 0.833 loss 5.23 ... lr 3.12e-05 img/s 412``."""
    total = f"/{max_steps}" if max_steps else ""
    parts = [f"step {record['step']}{total}"]
    if "epoch" in record:
        parts.append(f"epoch {fmt(float(record['epoch']))}")
    parts += [f"{short} {fmt(record[key])}" for key, short in LINE_KEYS if key in record]
    return " ".join(parts)


def format_all(record: dict) -> str:
    """Every key of a record, for train.log."""
    return " ".join(f"{k}={fmt(v)}" for k, v in record.items())


LONG_RUN_S = 24 * 3600  # a run this far from its end a few steps in is told so
PACE_STEPS = 5  # the steps over which the pace is judged, after the first (which holds the start-up)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h >= 48:
        return f"{h // 24}d{h % 24:02d}h"
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Console:
    def __init__(self, is_main: bool = True, progress: bool = True, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.is_main = is_main
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.want_bar = progress and self.tty
        self.bar = None
        self.max_steps: Optional[int] = None
        self._last = (time.perf_counter(), 0)  # (time, step) of the last bar refresh
        self.started = time.perf_counter()
        self.first_step: Optional[int] = None
        self.log_every = 0
        self.told_long = False
        self._paced_from: Optional[tuple[float, int]] = None  # (time, step) after the first step

    # -- plain output ------------------------------------------------------------------
    def print(self, line: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:  # a line between bar refreshes, not through them
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def lines(self, lines: list[str]) -> None:
        for line in lines:
            self.print(line)
            LOG.info("%s", line.strip())

    def warn(self, message: str) -> None:
        self.print(f"glsd: warning: {message}")
        if self.is_main:
            LOG.warning("%s", message)

    # -- the loop ----------------------------------------------------------------------
    def begin(self, step: int, max_steps: int, log_every: int = 0) -> None:
        self.max_steps, self.first_step, self.log_every = max_steps, step, log_every
        self.started = time.perf_counter()
        self._last = (self.started, step)
        if self.want_bar and self.is_main and step < max_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True,
                            file=self.stream)

    def update(self, step: int, loss: float, lr: float, global_batch: int) -> None:
        """Every step: the pace check, and the bar (a terminal only)."""
        self._check_pace(step)
        if self.bar is None:
            self._first_step_line(step)
            return
        self.bar.update(step - self.bar.n)
        now = time.perf_counter()
        last_time, last_step = self._last
        if now - last_time >= 0.5 or step == self.max_steps:
            rate = (step - last_step) * global_batch / max(now - last_time, 1e-9)
            self.bar.set_postfix_str(f"loss {fmt(loss)} lr {fmt(lr)} img/s {fmt(rate)}", refresh=False)
            self._last = (now, step)

    def _first_step_line(self, step: int) -> None:
        """Off a terminal, the first step says the run is alive (on a CPU the first log line
        may be many minutes away), and when the next line comes."""
        every = self.log_every
        if not (self.is_main and every > 1 and step == (self.first_step or 0) + 1 and step % every
                and step < (self.max_steps or 0)):
            return
        following = min(step + every - step % every, self.max_steps)
        self.print(f"step {step}/{self.max_steps} done in {duration(time.perf_counter() - self.started)} "
                   f"(start-up included); the next step line at step {following} (train.log_every={every})")

    def log(self, record: dict) -> None:
        """Every logging step: train.log always; the console when there is no bar."""
        if not self.is_main:
            return
        LOG.info("%s", format_all(record))
        timing = self._timing(record["step"])
        if self.bar is None:
            print(format_record(record, self.max_steps) + timing, file=self.stream, flush=True)

    def _timing(self, step: int) -> str:
        """`` elapsed 12m03s eta 1h40m00s`` at the pace since :meth:`begin` ("" before a step)."""
        eta = self._eta(step)
        if eta is None:
            return ""
        return f" elapsed {duration(time.perf_counter() - self.started)} eta {duration(eta)}"

    def _eta(self, step: int, since: Optional[tuple[float, int]] = None) -> Optional[float]:
        """Seconds to the end at the pace since ``since`` (time, step), by default :meth:`begin`."""
        start, at = since or (self.started, self.first_step or 0)
        if step <= at or not self.max_steps:
            return None
        return (time.perf_counter() - start) / (step - at) * max(self.max_steps - step, 0)

    def _check_pace(self, step: int) -> None:
        """Once, PACE_STEPS steps after the first (whose time holds the start-up: workers,
        compilation, a checkpoint read), a warning when the end is more than a day away."""
        done = step - (self.first_step or 0)
        if done == 1:
            self._paced_from = (time.perf_counter(), step)
        elif done == 1 + PACE_STEPS and self._paced_from and not self.told_long:
            eta = self._eta(step, self._paced_from)
            if eta is not None and eta > LONG_RUN_S:
                self.told_long = True
                since, at = self._paced_from
                self.warn(f"at this pace the schedule ends in about {duration(eta)} "
                          f"({fmt((step - at) / max(time.perf_counter() - since, 1e-9))} steps/s): a "
                          "faster device, a smaller backbone or fewer train.epochs shortens it; a "
                          "stopped run resumes where it was")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def end(self, step: int, global_batch: int, skipped: int, export: Optional[str],
            timm_loads_it: bool = True) -> None:
        self.close()
        elapsed = time.perf_counter() - self.started
        done = step - (self.first_step or 0)
        if done == 0:
            self.lines([f"glsd: nothing to train: the run is already at step {step} of its schedule "
                        "(to train longer: a higher train.max_steps, or train.epochs with train.extend=true)"])
        else:
            rate = done * global_batch / max(elapsed, 1e-9)
            skips = (f", {skipped} read{'' if skipped == 1 else 's'} of unreadable images skipped "
                     "(a file counts each epoch; each is named once in train.log)" if skipped else "")
            self.lines([f"glsd: done: {done} step{'' if done == 1 else 's'} (step {step}) in "
                        f"{duration(elapsed)}, {fmt(rate)} images/s{skips}"])
        if export:
            folder = Path(export).parent / "export" / "timm"
            loader = "for timm" if timm_loads_it else "for glsd.load_backbone: not a timm model"
            self.lines([f"glsd: teacher backbone exported to {export} (and, {loader}, {folder})"])


def labels_of(source) -> str:
    return (f"{len(source.classes)} classes" if source.classes and any(l >= 0 for l in source.labels)
            else "unlabelled")


def folder_reading(d, source) -> list[str]:
    """How data.source=auto reads the folder (class folders or not), and the rule, for a user
    whose photo tree by year might be read as classes."""
    if not (d.source == "auto" and d.root and not d.root.lower().endswith(".zip")):
        return []
    from glsd.data.sources import FOLDER_RULE, detect_kind

    kind, why = detect_kind(d.root)
    lines = [f"read as {kind} ({why}; rule: {FOLDER_RULE})"]
    if source.classes:
        names = ", ".join(source.classes[:5]) + (", ..." if len(source.classes) > 5 else "")
        lines.append(f"its class folders {names} are read as labels: pretraining does not use them, k-NN "
                     "and linear evaluation do; if they are not labels (photos by year, by "
                     "trip), data.source=folder")
    return lines


def start_summary(cfg, source, plan, device, amp_dtype, world_size: int, run_root,
                  resumed_step: Optional[int], skipped: int = 0) -> list[str]:
    """The lines printed before the first step (amp_dtype: the autocast dtype, None = fp32)."""
    d, t = cfg.data, cfg.train
    precision = "fp32" if amp_dtype is None else f"{str(amp_dtype).replace('torch.', '')} autocast"
    used = "all used" if plan.num_images == len(source) else f"{plan.num_images:,} images used"
    lines = [f"glsd pretrain {cfg.preset or '(defaults)'}",
             f"  data       {source.name}: {len(source):,} images found, {used}, {labels_of(source)}"]
    lines += [f"             {line}" for line in folder_reading(d, source)]
    reading = (f"unreadable images are {'skipped and counted' if d.on_error == 'skip' else 'errors'}"
               f" (data.on_error={d.on_error})")
    if skipped:
        reading += (f"; {skipped} read{'s' if skipped > 1 else ''} skipped so far (an unreadable "
                    "image counts once an epoch)")
    lines.append(f"             {reading}")
    grids = ", ".join(f"{g[0]}x{g[1]} at {name}" for name, g in plan.grids.items())
    stride = f", stride {plan.stride}" if plan.stride else ""
    lines.append(f"  model      {cfg.model.backbone}{stride}: grid {grids}")
    if cfg.model.init_from:
        lines.append(f"             backbone weights from {cfg.model.init_from} (model.init_from)")
    threshold = f", threshold {cfg.loss.match_threshold}" if cfg.loss.matching != "none" else ""
    lines.append(f"  matching   {cfg.loss.matching}{threshold}")
    lines.append(f"  device     {device}, precision {precision}")
    per_step = t.batch_size * world_size
    lines.append(f"  batch      {t.batch_size} per process x {world_size} process"
                 f"{'es' if world_size > 1 else ''} = {per_step} images per step")
    stop = f", stopping at train.max_steps={t.max_steps}" if t.max_steps else ""
    lines.append(f"  schedule   {plan.steps_per_epoch:,} steps/epoch x {t.epochs} epoch{'' if t.epochs == 1 else 's'} = "
                 f"{plan.total_steps:,} steps{stop}")
    lines.append(f"  run folder {run_root}")
    if resumed_step is not None:
        lines.append(f"  resumed at step {resumed_step}")
    lines += [f"  note: {n}" for n in plan.notes]
    return lines
