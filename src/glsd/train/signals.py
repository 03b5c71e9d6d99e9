"""SIGTERM / SIGINT during training: finish the step, checkpoint, stop (a second signal stops
at once)."""
from __future__ import annotations

import signal
import time
from typing import Optional

from glsd.errors import TrainingInterrupted


# The same signal again this soon is one request delivered twice, not a second request: a
# preempted torchrun job gets SIGTERM from the scheduler and, milliseconds later, from torchrun.
REPEAT_WINDOW_S = 0.1  # a person pressing Ctrl-C twice is slower than this


class StopRequested:
    """SIGTERM/SIGINT: finish the current step, write a checkpoint, exit cleanly. A second
    signal stops at once (a stuck data read, an impatient user): the step is dropped and the
    last checkpoint on disk, complete by construction, is what a rerun resumes. The first
    signal repeated within ``REPEAT_WINDOW_S`` is not a second one."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal == signum and time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return
        if self.signal is not None:
            raise TrainingInterrupted(
                f"stopped at once by a second signal {signum} ({signal.Signals(signum).name}), "
                "without finishing the step; the last checkpoint written (if any) is kept. "
                "Rerun the same command to resume.", signum)
        self.signal, self._first_at = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
