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


def fail_first(marks: str, i: int, seconds: float) -> int:
    """Task 0 fails once task 1 has started; the others sleep."""
    Path(marks, f"started-{i}").touch()
    if i == 0:
        while not Path(marks, "started-1").exists():
            time.sleep(0.02)
        raise ValueError("a cell's own error")
    return mark_then_sleep(marks, i, seconds)


class _Cycle:
    pass


def loader_in_a_cycle(i: int) -> int:
    """A DataLoader with a worker, reachable only through a reference cycle at the task's end
    (collected late): the worker process must not outlive the pool's shutdown."""
    from torch.utils.data import DataLoader

    from glsd.data.workers import leave_stop_signals_to_the_trainer, stop_workers_at_exit

    stop_workers_at_exit()
    holder = _Cycle()
    holder.me = holder
    holder.loader = DataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True,
                               worker_init_fn=leave_stop_signals_to_the_trainer)
    next(iter(holder.loader))
    return i


def one_killed_one_idle_one_checkpointing(marks: str, i: int) -> str:
    """A pool broken under its workers: task 1 ends at once (its worker idles), task 2 runs
    like a training cell (SIGTERM: finish, then write a checkpoint), and task 0 is killed (the
    OOM killer) once both are under way."""
    import os
    import signal

    Path(marks, f"started-{i}").touch()
    if i == 1:
        Path(marks, "done-1").touch()
        return "idle"
    if i == 0:
        while not (Path(marks, "done-1").exists() and Path(marks, "started-2").exists()):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
    stops = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stops.append(signum))
    deadline = time.monotonic() + 120
    while not stops and time.monotonic() < deadline:
        time.sleep(0.02)
    Path(marks, "checkpoint-2").write_text(f"stopped by {stops[:1]}")
    return "checkpointed"
