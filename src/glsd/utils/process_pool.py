"""Tasks in spawned processes, a few at a time, that stop as one.

A signal to the parent (Ctrl-C, a scheduler's SIGTERM, ``kill`` of its pid) reaches every
running task as SIGTERM, which a training run answers by finishing its step and writing a
checkpoint; no new task starts after it, and none waits in a queue behind it (tasks are
handed out one at a time, as workers free up). Without this, the parent dying left its
workers training their cells for hours, and a worker whose cell was interrupted took the
next queued cell.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Optional, Sequence

from glsd.errors import TrainingInterrupted

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_here(signum, frame):
    raise TrainingInterrupted(f"stopped by signal {signum} ({signal.Signals(signum).name})", signum)


def _worker_start(threads: Optional[int]) -> None:
    """A worker's set-up: its share of the cores; stop signals ignored while it waits for a
    task (a worker that died of one would break the pool, and the tasks of the others with it)."""
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _run_task(task: Callable, *args):
    """The task, with a stop signal that ends it outside training too (an evaluation, a
    floor); training installs its own handler meanwhile (finish the step, checkpoint, stop)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _stop_here)
    try:
        return task(*args)
    finally:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


class _StopForwarder:
    """In the parent: SIGINT / SIGTERM are recorded and sent on to every worker as SIGTERM
    (never SIGINT: a worker that got Ctrl-C from the terminal too would read a second SIGINT as
    "stop at once", without its checkpoint)."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in _STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = self.signal or signum
        self.stop_workers()

    @staticmethod
    def stop_workers() -> None:
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signal.SIGTERM)
            except (OSError, TypeError):  # gone already, or not started
                pass

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_stoppable(task: Callable, calls: Sequence[tuple], jobs: int, threads: Optional[int],
                  on_result: Callable[[int, object], None]) -> None:
    """``task(*calls[i])`` for every i, ``jobs`` at a time in spawned processes (CUDA cannot be
    re-initialised in a forked child), each with ``threads`` torch threads; ``on_result(i,
    result)`` in the parent as each ends, in any order.

    Raises TrainingInterrupted once the running tasks have stopped, when the parent got a
    stop signal or a task was interrupted (then the others are stopped too: a scheduler that
    stopped one stopped the job). Any other exception of a task is raised as it comes.
    """
    queue = list(enumerate(calls))
    running: dict = {}
    interrupted: Optional[TrainingInterrupted] = None
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_start,
                             initargs=(threads,)) as pool, _StopForwarder() as stop:
        try:
            while queue or running:
                while queue and len(running) < jobs and stop.signal is None and interrupted is None:
                    i, args = queue.pop(0)
                    running[pool.submit(_run_task, task, *args)] = i
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    i = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        if stop.signal is None:
                            raise
                        continue  # a worker still starting when the stop came died of it
                    except TrainingInterrupted as e:
                        if interrupted is None and stop.signal is None:
                            stop.stop_workers()  # the others stop with it
                        interrupted = interrupted or e
                        continue
                    on_result(i, result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if stop.signal is not None or interrupted is not None:
        signum = stop.signal or interrupted.signal
        raise TrainingInterrupted(
            f"stopped by signal {signum} ({signal.Signals(signum).name}): the running tasks "
            "stopped (a training run after its checkpoint); rerun the same command to resume", signum)
