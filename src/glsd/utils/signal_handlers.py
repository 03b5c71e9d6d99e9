"""Install and restore handlers of stop signals (training's StopRequested, the study pool's
forwarder): only the main thread may, elsewhere nothing is installed."""
from __future__ import annotations

import signal
from typing import Callable, Iterable


def install(signums: Iterable[int], handler: Callable) -> dict:
    """``handler`` for each signal; returns the handlers it replaced (none off the main thread)."""
    previous = {}
    for sig in signums:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
