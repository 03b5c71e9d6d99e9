"""run_stoppable: tasks a few at a time in spawned processes, stopped as one by a signal."""
import multiprocessing
import os
import signal
import threading
import time

import pytest

from glsd.errors import TrainingInterrupted
from glsd.utils.process_pool import run_stoppable
from pool_tasks import mark_then_sleep


def test_every_task_runs_and_reports_its_result(tmp_path):
    results = {}
    run_stoppable(mark_then_sleep, [(str(tmp_path), i, 0.05) for i in range(4)], jobs=2, threads=1,
                  on_result=results.__setitem__)
    assert results == {0: 0, 1: 1, 2: 2, 3: 3}


def signal_when_started(marks, count, signum):
    while len(list(marks.iterdir())) < count:
        time.sleep(0.05)
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_stops_the_running_tasks_and_starts_no_other(tmp_path, signum):
    """The parent killed by a scheduler (SIGTERM) or Ctrl-C: its running tasks get SIGTERM and
    end now, not after their 120 s; the 4 queued tasks never start."""
    results = {}
    started = time.monotonic()
    threading.Thread(target=signal_when_started, args=(tmp_path, 2, signum), daemon=True).start()
    with pytest.raises(TrainingInterrupted, match="rerun the same command to resume") as stop:
        run_stoppable(mark_then_sleep, [(str(tmp_path), i, 120.0) for i in range(6)], jobs=2,
                      threads=1, on_result=results.__setitem__)
    assert stop.value.signal == signum
    assert time.monotonic() - started < 90  # not the tasks' 120 s
    assert results == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started-0", "started-1"]
    # the parent's own handlers are back
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN


def test_a_task_stopped_on_its_own_stops_the_others(tmp_path):
    """One worker signalled (a scheduler preempting the job reaches every process, in any
    order): the others are stopped too rather than left training for hours."""
    def stop_one_worker():
        while len(list(tmp_path.iterdir())) < 2:
            time.sleep(0.05)
        workers = [c for c in multiprocessing.active_children() if c.name.startswith("SpawnProcess")]
        os.kill(workers[0].pid, signal.SIGTERM)

    started = time.monotonic()
    threading.Thread(target=stop_one_worker, daemon=True).start()
    with pytest.raises(TrainingInterrupted):
        run_stoppable(mark_then_sleep, [(str(tmp_path), i, 120.0) for i in range(6)], jobs=2,
                      threads=1, on_result=lambda i, r: None)
    assert time.monotonic() - started < 90  # not the tasks' 120 s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started-0", "started-1"]


def test_a_task_error_stops_the_others_before_it_is_raised(tmp_path):
    """A cell's error outside its own try (a lock it cannot take, a full disk) must not leave
    the parent waiting hours for the other cells, its signal handlers already gone."""
    from pool_tasks import fail_first

    started = time.monotonic()
    with pytest.raises(ValueError, match="a cell's own error"):
        run_stoppable(fail_first, [(str(tmp_path), i, 120.0) for i in range(4)], jobs=2, threads=1,
                      on_result=lambda i, r: None)
    assert time.monotonic() - started < 90  # not the tasks' 120 s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started-0", "started-1"]


def test_a_stop_during_the_hand_over_is_not_lost():
    """A signal that came while the worker still ignored it (the task being handed over) is
    read from the pool's flag: the task does not start."""
    from glsd.utils import process_pool

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    flag = threading.Event()
    flag.set()
    try:
        process_pool._worker_start(None, flag, multiprocessing.RawValue("b", 0))
        ran = []
        with pytest.raises(TrainingInterrupted):
            process_pool._run_task(ran.append, 1)
        assert ran == []
    finally:
        process_pool._stop_flag = process_pool._broken_flag = None  # this process is no worker
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_task_that_leaves_a_loader_worker_behind_does_not_hang_the_pool(tmp_path):
    """A pool worker runs no atexit hook; multiprocessing terminates and joins its children
    instead, and a loader worker ignores that first SIGTERM: the join waited forever."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from glsd.utils.process_pool import run_stoppable\n"
              "from pool_tasks import loader_in_a_cycle\n"
              "if __name__ == '__main__':\n"
              "    run_stoppable(loader_in_a_cycle, [(0,)], 1, 1, lambda i, r: print('result', r))\n")
    (tmp_path / "run.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "result 0" in done.stdout


BROKEN_POOL = """
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from glsd.utils.process_pool import run_stoppable
import pool_tasks


def slow_report(i, result):  # a study draws its report after each cell
    Path(sys.argv[1], f"handled-{i}").touch()
    time.sleep(1.0)


if __name__ == "__main__":
    task, jobs = {"idle and checkpointing": (pool_tasks.one_killed_one_idle_one_checkpointing, 3),
                  "between result and hand-over": (pool_tasks.killed_after_a_result, 2)}[sys.argv[2]]
    try:
        run_stoppable(task, [(sys.argv[1], i) for i in range(3)], jobs=jobs, threads=None,
                      on_result=slow_report)
    except BrokenProcessPool:
        print("broken pool raised")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("scenario", ["idle and checkpointing", "between result and hand-over"])
def test_a_worker_killed_breaks_the_pool_without_waiting_on_the_others(tmp_path, scenario):
    """A worker killed (the OOM killer): the error is raised once the running task has stopped
    with its checkpoint; an idle worker (stop signals ignored) does not keep the pool waiting
    for it, also when the parent was busy between a result and the next hand-over. On Python
    3.12+ both waited forever (3.11 ends idle workers itself: there the worker-side test below
    is the one that fails without the fix). In a subprocess, so that a hang fails the test."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers_tiny import subprocess_env

    script = tmp_path / "broken_pool.py"
    script.write_text(BROKEN_POOL)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = subprocess_env()
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env["PYTHONPATH"]
    out = subprocess.run([sys.executable, str(script), str(marks), scenario], env=env,
                         capture_output=True, text=True, timeout=90)
    assert "broken pool raised" in out.stdout, out.stderr[-2000:]
    if scenario == "idle and checkpointing":
        assert (marks / "checkpoint-2").read_text() == f"stopped by [{int(signal.SIGTERM)}]"
    else:
        assert not (marks / "started-2").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_broken_pools_signal_ends_idle_workers_and_lets_tasks_finish(tmp_path):
    """What the parent of a broken pool sends (SIGUSR1, its flag set): an idle worker exits at
    once, a running task finishes before its worker exits. Without the flag (a scheduler's
    SIGUSR1, e.g. Slurm's --signal) a worker dies of it, as any process whose parent does."""
    from pool_tasks import _work_like_a_pool_worker

    ctx = multiprocessing.get_context("spawn")
    stop, broken, unbroken = ctx.Event(), ctx.RawValue("b", 0), ctx.RawValue("b", 0)
    workers = {name: ctx.Process(target=_work_like_a_pool_worker,
                                 args=(stop, flag, str(tmp_path), name, seconds))
               for name, flag, seconds in (("idle", broken, 0), ("busy", broken, 3.0),
                                           ("outside", unbroken, 0))}
    for w in workers.values():
        w.start()
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    broken.value = 1
    sent = time.monotonic()
    for w in workers.values():
        os.kill(w.pid, signal.SIGUSR1)
    for w in workers.values():
        w.join(timeout=30)
    assert workers["idle"].exitcode == 1 and workers["busy"].exitcode == 1
    # the busy one finished its task, then exited (not back to idling)...
    assert (tmp_path / "task-done-busy").exists() and not (tmp_path / "after-task-busy").exists()
    assert workers["outside"].exitcode == -signal.SIGUSR1
    assert time.monotonic() - sent < 25  # ...not after its 60 s of idling
