"""Tasks in spawned processes, a few at a time, that stop as one.

A signal to the parent (Ctrl-C, a scheduler's SIGTERM, ``kill`` of its pid) reaches every
running task as SIGTERM, which a training run answers by finishing its step and writing a
checkpoint; a second one is sent on as SIGINT, which stops a run at once. No new task starts
after a stop, and none waits in a queue behind it (tasks are handed out one at a time, as
workers free up). Without this, the parent dying left its workers training their cells for
hours, and a worker whose cell was interrupted took the next queued cell.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Optional, Sequence

from glsd.errors import TrainingInterrupted
from glsd.utils import signal_handlers

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Sent to the workers of a broken pool (one was killed: the OOM killer): a worker exits once
# it has no task (a running one is stopped by SIGTERM, with its checkpoint). Python 3.12+ joins
# every worker of a broken pool, and an idle one ignores SIGTERM: without this it waited forever.
_BROKEN_POOL_SIGNAL = getattr(signal, "SIGUSR1", None)  # None on Windows
_stop_flag = None  # in a worker: the pool's stop event, set by the parent before it signals
_broken_flag = None  # in a worker: set by the parent before it sends _BROKEN_POOL_SIGNAL
_in_task = False  # in a worker: a task is running
_pool_broken = False  # in a worker: exit when the task ends


def _stop_here(signum, frame):
    _idle()  # raise once: a second signal would cut the first one's clean-up
    raise TrainingInterrupted(f"stopped by signal {signum} ({signal.Signals(signum).name})", signum)


def _idle() -> None:
    """Between tasks a worker ignores stop signals: one that died of one would break the pool,
    and one that exited at once could do so holding the task queue's lock, leaving every other
    worker blocked on it. The parent ends idle workers with the pool's shutdown."""
    signal_handlers.install(_STOP_SIGNALS, signal.SIG_IGN)


def _leave_broken_pool(signum, frame) -> None:
    global _pool_broken
    if not _broken_flag.value:  # not the parent's (a scheduler's SIGUSR1): its default, death
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _pool_broken = True
    if not _in_task:
        os._exit(1)


def _worker_start(threads: Optional[int], stop_flag, broken_flag) -> None:
    """A worker's set-up: its share of the cores, stop signals ignored while it waits for a
    task (:func:`_idle`), and an exit when the pool is broken (_BROKEN_POOL_SIGNAL)."""
    global _stop_flag, _broken_flag
    _stop_flag, _broken_flag = stop_flag, broken_flag
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    if _BROKEN_POOL_SIGNAL is not None:
        signal.signal(_BROKEN_POOL_SIGNAL, _leave_broken_pool)
    _idle()


def raise_if_stopped() -> None:
    """In a task: stop here if the pool was told to stop (a signal the task's own handler took,
    e.g. training's, which ends the run normally when it comes after the last step). Outside
    a pool: nothing."""
    if _stop_flag is not None and _stop_flag.is_set():
        raise TrainingInterrupted("stopped: the parent process was told to stop", signal.SIGTERM)


def _run_task(task: Callable, *args):
    """The task, with a stop signal that ends it outside training too (an evaluation, a
    floor); training installs its own handler meanwhile (finish the step, checkpoint, stop).
    A stop that came while the task was being handed over (signals ignored) is read from the
    pool's flag once the handler is in place."""
    global _in_task
    _in_task = True
    signal_handlers.install(_STOP_SIGNALS, _stop_here)
    try:
        raise_if_stopped()
        return task(*args)
    finally:
        _in_task = False
        _idle()
        if _pool_broken:  # nobody reads the result of a broken pool
            os._exit(1)


class _StopForwarder:
    """In the parent: SIGINT / SIGTERM are recorded and sent on to the pool's workers, the
    first as SIGTERM (never SIGINT: a worker that got Ctrl-C from the terminal too would read a
    second SIGINT as "stop at once", without its checkpoint), a later one as SIGINT (stop at
    once, as a second Ctrl-C does)."""

    def __init__(self, stop_flag, broken_flag):
        self.signal: Optional[int] = None
        self.stop_flag = stop_flag
        self.broken_flag = broken_flag
        self._previous = {}
        self._others = set()

    def __enter__(self):
        self._others = {p.pid for p in multiprocessing.active_children()}  # not the pool's
        self._previous = signal_handlers.install(_STOP_SIGNALS, self._handle)
        return self

    def _handle(self, signum, frame):
        again = self.signal is not None
        self.signal = self.signal or signum
        self.stop_workers(signal.SIGINT if again else signal.SIGTERM)

    def stop_workers(self, signum: int = signal.SIGTERM) -> None:
        self.stop_flag.set()
        self._send(signum)

    def end_idle_workers_if_broken(self, future) -> None:
        """A future's done-callback: if the pool broke, its workers exit once they have no task
        (its running tasks are sent SIGTERM by the pool). The pool's own thread runs it, before
        it joins the workers: the parent's loop may be waiting on that thread meanwhile."""
        if future.cancelled() or not isinstance(future.exception(), BrokenProcessPool):
            return
        if _BROKEN_POOL_SIGNAL is not None:
            self.broken_flag.value = 1
            self._send(_BROKEN_POOL_SIGNAL)

    def _send(self, signum: int) -> None:
        for child in multiprocessing.active_children():
            if child.pid in self._others:
                continue
            try:
                os.kill(child.pid, signum)
            except (OSError, TypeError):  # gone already, or not started
                pass

    def __exit__(self, *exc):
        signal_handlers.restore(self._previous)


def run_stoppable(task: Callable, calls: Sequence[tuple], jobs: int, threads: Optional[int],
                  on_result: Callable[[int, object], None]) -> None:
    """``task(*calls[i])`` for every i, ``jobs`` at a time in spawned processes (CUDA cannot be
    re-initialised in a forked child), each with ``threads`` torch threads; ``on_result(i,
    result)`` in the parent as each ends, in any order.

    Raises TrainingInterrupted once the running tasks have stopped, when the parent got a
    stop signal or a task was interrupted (then the others are stopped too: a scheduler that
    stopped one stopped the job). Any other exception of a task stops the others and is raised
    once they have stopped.
    """
    ctx = multiprocessing.get_context("spawn")
    stop_flag, broken_flag = ctx.Event(), ctx.RawValue("b", 0)  # raw: read in a signal handler
    queue = list(enumerate(calls))
    running: dict = {}
    interrupted: Optional[TrainingInterrupted] = None
    # The forwarder outlives the pool: a signal while the pool shuts down still reaches it.
    with _StopForwarder(stop_flag, broken_flag) as stop, ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_worker_start,
            initargs=(threads, stop_flag, broken_flag)) as pool:
        try:
            while queue or running:
                while queue and len(running) < jobs and stop.signal is None and interrupted is None:
                    i, args = queue.pop(0)
                    future = pool.submit(_run_task, task, *args)
                    future.add_done_callback(stop.end_idle_workers_if_broken)
                    running[future] = i
                if not running:
                    break
                done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    i = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        if stop.signal is None and interrupted is None:
                            raise
                        continue  # a worker still starting when the stop came died of it
                    except TrainingInterrupted as e:
                        if interrupted is None and stop.signal is None:
                            stop.stop_workers()  # the others stop with it
                        interrupted = interrupted or e
                        continue
                    on_result(i, result)
        except BaseException:
            stop.stop_workers()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if stop.signal is not None or interrupted is not None:
        signum = stop.signal or interrupted.signal
        raise TrainingInterrupted(
            f"stopped by signal {signum} ({signal.Signals(signum).name}): the running tasks "
            "stopped (a training run after its checkpoint); rerun the same command to resume", signum)
