"""Tasks for tests/test_process_pool.py: importable by the spawned workers (module level)."""
import time
from pathlib import Path


def mark_then_sleep(marks: str, i: int, seconds: float) -> int:
    """Leave a file saying task i started, then sleep (a stand-in for a study cell)."""
    Path(marks, f"started-{i}").touch()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return i
