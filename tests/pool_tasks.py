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


def killed_after_a_result(marks: str, i: int) -> str:
    """Task 1 ends at once; task 0 is killed once the parent has taken task 1's result (and is
    busy with it, as a study drawing its report), so the pool breaks between a result and the
    next hand-over; task 2 waits its turn."""
    import os
    import signal

    Path(marks, f"started-{i}").touch()
    if i == 0:
        while not Path(marks, "handled-1").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
    return "done"


def _work_like_a_pool_worker(stop_flag, broken_flag, marks: str, name: str, task_seconds: float) -> None:
    """A process set up as the pool's workers are; with ``task_seconds``, it runs a task that
    long (``task-done`` marks its end); then it idles as a worker does between tasks."""
    from glsd.utils import process_pool

    process_pool._worker_start(None, stop_flag, broken_flag)
    Path(marks, f"ready-{name}").touch()
    if task_seconds:
        process_pool._run_task(_sleep_then_mark, marks, name, task_seconds)
        Path(marks, f"after-task-{name}").touch()
    time.sleep(60)


def _sleep_then_mark(marks: str, name: str, seconds: float) -> None:
    time.sleep(seconds)
    Path(marks, f"task-done-{name}").touch()
