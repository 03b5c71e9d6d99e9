"""How loader workers (training and evaluation) take stop signals: the training process owns
the stop, the workers help it finish.

A scheduler's SIGTERM, or Ctrl-C in a terminal, reaches every process of the job. A worker
killed by it makes the training process raise at once (torch's worker watchdog), mid-step,
before it can finish the step and write its checkpoint. So a worker ignores the first stop
signal and ends quietly at the next one: the trainer's own shutdown of a worker it cannot
stop otherwise (one stuck in a read), or a second signal from someone who wants it over now.
"""
from __future__ import annotations

import os
import signal

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
