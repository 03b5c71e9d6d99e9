"""How loader workers (training and evaluation) take stop signals: the training process owns
the stop, the workers help it finish. And how a worker's death is told apart and worded.

A scheduler's SIGTERM, or Ctrl-C in a terminal, reaches every process of the job. A worker
killed by it makes the training process raise at once (torch's worker watchdog), mid-step,
before it can finish the step and write its checkpoint. So a worker ignores the first stop
signal and ends quietly at the next one: the trainer's own shutdown of a worker it cannot
stop otherwise (one stuck in a read), or a second signal from someone who wants it over now.
"""
from __future__ import annotations

import os
import signal
from glsd.errors import WorkerDied

_stop_signals_seen = 0


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
    return WorkerDied(f"a data loader worker died ({str(error).splitlines()[0]}); {saved.rstrip('.')}. If it "
                     "happens again: out of memory (lower data.num_workers or train.batch_size) "
                     "or a decoder crash on one file (data.num_workers=0 shows the error where "
                     "it happens)")
