"""SIGTERM / SIGINT during training: finish the step, checkpoint, stop (a second Ctrl-C stops
at once)."""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

from glsd.errors import TrainingInterrupted
from glsd.utils import signal_handlers


_late_stop: Optional[int] = None  # a signal that came while a finished run was being written


def take_late_stop() -> Optional[int]:
    """The stop signal that came after a run's last step, while it was finishing (checkpoint,
    export): the run is complete, but whoever runs more after it (a study's evaluations, its
    next cell) should stop. Cleared on reading."""
    global _late_stop
    signum, _late_stop = _late_stop, None
    return signum


def note_late_stop(signum: int) -> None:
    global _late_stop
    _late_stop = int(signum)


# The same SIGINT again this soon is one request delivered twice (a key repeat), not a second one.
REPEAT_WINDOW_S = 0.1  # a person pressing Ctrl-C twice is slower than this


class StopRequested:
    """SIGTERM/SIGINT: finish the current step, write a checkpoint, exit cleanly. A second
    Ctrl-C stops at once (a stuck data read, an impatient user): the step is dropped and the
    last checkpoint on disk, complete by construction, is what a rerun resumes.

    Repeats that are one request delivered twice never stop at once: a SIGTERM (a scheduler
    and torchrun, or srun, both send it to a preempted job, and a machine follows up with
    SIGKILL, not with a second SIGTERM), any signal under torchrun (it forwards every signal it
    gets, and kills the workers itself after its shutdown timeout), and the same SIGINT within
    ``REPEAT_WINDOW_S``. Python runs a handler only between bytecodes, so a copy delivered
    milliseconds after the first may be handled seconds later, after a long C call: timing
    alone cannot tell it from a person's second press.
    """

    def __init__(self):
        self.signal: Optional[int] = None
        self._first_at = 0.0
        self._previous = {}
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ

    def __enter__(self):
        self._previous = signal_handlers.install((signal.SIGTERM, signal.SIGINT), self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self._first_at = signum, time.monotonic()
        elif self._stops_at_once(signum):
            raise TrainingInterrupted(
                f"stopped at once by a second signal {signum} ({signal.Signals(signum).name}), "
                "without finishing the step; the last checkpoint written (if any) is kept. "
                "Rerun the same command to resume.", signum)

    def _stops_at_once(self, signum: int) -> bool:
        if signum == signal.SIGTERM or self.under_torchrun:
            return False
        return not (signum == self.signal and time.monotonic() - self._first_at < REPEAT_WINDOW_S)

    def __exit__(self, *exc):
        signal_handlers.restore(self._previous)
