"""How loader workers (training and evaluation) take stop signals: the training process owns
the stop, the workers help it finish. And how a worker's death is told apart and worded.

A scheduler's SIGTERM, or Ctrl-C in a terminal, reaches every process of the job. A worker
killed by it makes the training process raise at once (torch's worker watchdog), mid-step,
before it can finish the step and write its checkpoint. So a worker ignores the first stop
signal and ends quietly at the next one: the trainer's own shutdown of a worker it cannot
stop otherwise (one stuck in a read), or a second signal from someone who wants it over now.

The one signal they get is then not enough at the parent's exit after an error: Python's
multiprocessing terminates its daemonic children once (one SIGTERM, ignored) and joins them,
forever. So the parent kills its loader workers first, at exit (:func:`stop_workers_at_exit`).
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401 - registers its exit hook now, so that ours runs before it
import os
import signal
from glsd.errors import WorkerDied

_stop_signals_seen = 0
_exit_hook_registered = False


def stop_workers_at_exit() -> None:
    """Parent side, before a loader with workers starts: at interpreter exit (an error, a broken
    pipe, the end) its workers are killed before multiprocessing joins them. A loader shut down
    normally has none left; a worker holds nothing to save. Registered once, after
    multiprocessing's own exit hook, so it runs first."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_loader_workers)
        # A multiprocessing child (a `glsd study --jobs` cell) runs no atexit hook: it runs
        # these finalizers, then terminates and joins its daemonic children. A loader worker
        # ignores that first SIGTERM, so the join would wait for it forever.
        multiprocessing.util.Finalize(None, _kill_loader_workers, exitpriority=10)
        _exit_hook_registered = True


def _kill_loader_workers() -> None:
    workers = [c for c in multiprocessing.active_children() if c.daemon and _is_loader_worker(c.pid)]
    if workers and hasattr(signal, "SIGCHLD"):  # torch's handler would report them "killed"
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()  # multiprocessing would terminate it next, once


def _is_loader_worker(pid: int) -> bool:
    """torch names its loader worker processes; where the name cannot be read (no /proc), any
    daemonic child is taken for one."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "pt_data_worker"
    except OSError:
        return True


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: SIGTERM and SIGINT as the module says."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_stop_signal)


def _on_stop_signal(signum, frame) -> None:
    global _stop_signals_seen
    _stop_signals_seen += 1
    if _stop_signals_seen > 1:
        os._exit(0)  # quietly, as torch's own worker does when its parent terminates it


def is_worker_death(error: BaseException) -> bool:
    """torch's error for a loader worker that died (killed, or exited without a word): raised
    at the next batch, or by its SIGCHLD handler wherever the trainer was. Not a worker's own
    exception, which torch re-raises as "Caught X in DataLoader worker process N"."""
    return isinstance(error, RuntimeError) and "DataLoader worker (pid" in str(error)


def worker_died(error: BaseException, saved: str) -> WorkerDied:
    """The one message for a dead worker; ``saved`` says what the run kept."""
    spawned = ("; from a Python script on macOS or Windows, also check that it calls glsd under "
               "`if __name__ == \"__main__\":` (workers import it again)"
               if multiprocessing.get_start_method(allow_none=True) in ("spawn", "forkserver") else "")
    return WorkerDied(f"a data loader worker died ({str(error).splitlines()[0]}); {saved.rstrip('.')}. If it "
                     "happens again: out of memory (lower data.num_workers or train.batch_size) "
                     "or a decoder crash on one file (data.num_workers=0 shows the error where "
                     f"it happens){spawned}")
