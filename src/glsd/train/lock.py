"""An exclusive lock on a folder: ``<folder>/.glsd.lock`` holding the owner's pid and host.

Two processes writing one run folder interleave metrics and overwrite each other's
checkpoints, so pretraining, evaluation writes and study cells take this lock first. The
file is created with O_EXCL (atomic on local and NFS v3+ file systems). A lock whose owner is
gone (same host, dead pid) is stale and taken over. A lock of another host cannot be checked
that way (a job requeued on another node after its node died): its owner refreshes the file's
time every HEARTBEAT_S, and a lock left unrefreshed for LEASE_S, by the clock of the file
system that holds it, is taken over; a lock without a heartbeat (an older glsd) is refused,
naming the host and pid so the user can remove it. An owner whose lock was taken over (it was
suspended past the lease) stops before its next checkpoint or metrics line (:func:`check_owned`). The lock is
re-entrant within one process (a study cell locks its folder, then pretrains in it). Under
torchrun only rank 0 takes it; the other ranks share it.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from glsd.errors import NotWritable, RunFolderBusy
from glsd.run_layout import CHECKPOINT_DIR

LOCK_NAME = ".glsd.lock"
_held: dict[Path, int] = {}  # lock path -> depth, in this process
_created_dirs: set[Path] = set()  # folders this process created only to lock them
_WINDOWS = os.name == "nt"
HEARTBEAT_S = 60.0  # an owner refreshes its lock file's time this often
LEASE_S = 900.0  # another host's lock unrefreshed this long is taken over (15 missed beats)
_heartbeat: Optional[threading.Thread] = None


def is_lock_file(name: str) -> bool:
    """The lock file, or a companion a lock check writes for a moment (a clock probe, a stale
    lock moved aside): not the run's content."""
    return name == LOCK_NAME or name.startswith((f"{LOCK_NAME}.now-", f"{LOCK_NAME}.stale-"))


def _alive(pid: int) -> bool:
    if _WINDOWS:  # os.kill(pid, 0) there sends CTRL_C_EVENT, or terminates the process
        return _alive_on_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _alive_on_windows(pid: int) -> bool:
    import _winapi

    synchronize = 0x00100000
    try:
        handle = _winapi.OpenProcess(synchronize, False, pid)
    except PermissionError:  # ERROR_ACCESS_DENIED: another user's process, which exists
        return True
    except OSError:  # ERROR_INVALID_PARAMETER: no such process
        return False
    try:  # a handle also opens on a process that has exited but is still referenced
        return _winapi.WaitForSingleObject(handle, 0) == _winapi.WAIT_TIMEOUT
    finally:
        _winapi.CloseHandle(handle)


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid
    from the lock's owner; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _read(path: Path) -> Optional[dict]:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _stale(path: Path, info: Optional[dict]) -> bool:
    if info is None:  # torn or foreign content: stale once it is older than a write takes
        try:
            return time.time() - path.stat().st_mtime > 10.0
        except FileNotFoundError:
            return True
    if info.get("host") != socket.gethostname():
        age = _unrefreshed_for(path) if "heartbeat_s" in info else None
        return age is not None and age > LEASE_S
    pid = info.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    started = info.get("pid_start")
    return started is not None and _start_time(pid) not in (None, started)  # pid reused


def _unrefreshed_for(path: Path) -> Optional[float]:
    """Seconds since ``path`` was last refreshed, by its file system's clock: a file created
    beside it now gives that clock's time (another host's clock may be set otherwise); None
    when that cannot be told (the probe cannot be written): the lock then never expires."""
    probe = path.with_name(f"{path.name}.now-{socket.gethostname()}-{os.getpid()}")
    try:
        probe.write_bytes(b"")
        now = probe.stat().st_mtime
        return now - path.stat().st_mtime
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _refresh_held_locks() -> None:
    """The heartbeat (a daemon thread): every HEARTBEAT_S, the time of each lock this
    process holds is set to now."""
    while True:
        time.sleep(HEARTBEAT_S)
        for path in list(_held):
            info = _read(path)  # a lock taken over is the new owner's: not kept alive from here
            if info is not None and (info.get("pid"), info.get("host")) == (os.getpid(), socket.gethostname()):
                with contextlib.suppress(OSError):
                    os.utime(path)


def _start_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is None or not _heartbeat.is_alive():
        _heartbeat = threading.Thread(target=_refresh_held_locks, name="glsd-lock-heartbeat", daemon=True)
        _heartbeat.start()


def check_owned(folder: Path) -> None:
    """Raise RunFolderBusy if the lock this process took on ``folder`` is now another
    process's (taken over while this one was suspended past the lease): it must not write."""
    path = Path(folder).resolve() / LOCK_NAME
    if path not in _held:
        return
    info = _read(path)
    if info is not None and (info.get("pid"), info.get("host")) != (os.getpid(), socket.gethostname()):
        del _held[path]
        raise RunFolderBusy(f"{folder} was taken over by process {info.get('pid')} on host "
                            f"{info.get('host')} ({info.get('command', '?')}) while this process did "
                            f"not refresh its lock for {LEASE_S:.0f} s (suspended?); this process "
                            "stops without writing there: the other one goes on with the run")


def acquire(folder: Path, what: str = "glsd") -> Path:
    """Lock ``folder`` (created if missing) for this process; raise RunFolderBusy if a live
    process holds it. Returns the lock file's path."""
    folder = Path(folder).resolve()
    path = folder / LOCK_NAME
    if path in _held:
        _held[path] += 1
        return path
    try:
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
                _created_dirs.add(folder)
            except FileExistsError:  # another process made it in between: fine
                pass
        return _create(folder, path, what)
    except OSError as e:
        if folder in _created_dirs:  # made only to hold the lock: not left behind empty
            _created_dirs.discard(folder)
            with contextlib.suppress(OSError):
                folder.rmdir()
        fix = ("a part of that path is a file, not a folder: choose another path" if e.errno == errno.ENOTDIR
               else "fix its permissions, free space, or use a writable copy")
        raise NotWritable(e.errno, f"cannot write in {folder} ({e.strerror or e}); nothing was "
                          f"computed. {fix[0].upper()}{fix[1:]}") from None


def _create(folder: Path, path: Path, what: str) -> Path:
    record = json.dumps({"pid": os.getpid(), "pid_start": _start_time(os.getpid()),
                         "host": socket.gethostname(), "what": what,
                         "command": " ".join(sys.argv)[:500], "started": time.time(),
                         "heartbeat_s": HEARTBEAT_S})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read(path)
            if _stale(path, info):
                _take_over(path, info)
                continue
            raise RunFolderBusy(_busy_message(folder, path, info)) from None
        with os.fdopen(fd, "w") as f:
            f.write(record)
        _held[path] = 1
        _start_heartbeat()
        return path
    raise RunFolderBusy(_busy_message(folder, path, _read(path)))


def _take_over(path: Path, info: Optional[dict]) -> None:
    """Remove the stale lock ``info`` was read from, and nothing else: two processes may find
    it stale at once, and the slower one must not delete the lock the faster one just took.
    The file is moved aside (atomic) and checked; a fresh lock moved by mistake is put back."""
    aside = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process removed it first
        return
    if _read(aside) != info:  # not the stale record: another process's fresh lock
        with contextlib.suppress(OSError):
            os.link(aside, path)  # back in place, unless a third process holds path now
        aside.unlink(missing_ok=True)
        return
    if info and info.get("host") != socket.gethostname():
        who = (f"process {info.get('pid')} on host {info.get('host')} has not refreshed it for "
               f"over {LEASE_S:.0f} s: gone, or suspended (it will stop before writing again)")
    else:
        who = f"pid {info.get('pid')} is gone" if info else "an unreadable lock"
    print(f"glsd: taking over the stale lock {path} ({who})", file=sys.stderr)
    aside.unlink(missing_ok=True)


def _busy_message(folder: Path, path: Path, info: Optional[dict]) -> str:
    if info is None:
        owner = "another process (the lock file is being written)"
    else:
        owner = f"process {info.get('pid')} on host {info.get('host')} ({info.get('what')}: " \
                f"{info.get('command', '?')})"
    lease = ""
    if info and "heartbeat_s" in info and info.get("host") != socket.gethostname():
        age = _unrefreshed_for(path)
        lease = ((f"; it was refreshed {age:.0f} s ago, and " if age is not None else "; ")
                 + f"a lock another host refreshes is taken over {LEASE_S:.0f} s after its last refresh"
                 + ("" if age is not None else f" (its age cannot be told: nothing can be written in {folder})"))
    return (f"{folder} is in use by {owner}. Wait for it to finish, or use another folder; "
            f"if that process is gone (another host's lock cannot be checked), delete {path}{lease}.")


def release(folder: Path) -> None:
    """Drop one level of this process's lock; the last one removes the lock file (and the
    folder, if acquire created it and nothing else was written)."""
    folder = Path(folder).resolve()
    path = folder / LOCK_NAME
    if path not in _held:
        return
    _held[path] -= 1
    if _held[path] > 0:
        return
    del _held[path]
    info = _read(path)
    if info is not None and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
    if folder in _created_dirs:
        _created_dirs.discard(folder)
        try:
            folder.rmdir()  # only if empty: a failed start leaves no folder behind
        except OSError:
            pass


def holds(folder: Path) -> bool:
    return (Path(folder).resolve() / LOCK_NAME) in _held


def run_of(path) -> Path:
    """The run folder that a path given to evaluate belongs to: a run folder itself; the run
    above ``checkpoints/`` for a checkpoint; the run above ``export/<name>/`` for an export
    folder or a file in it (when that run has its config.yaml); else the file's folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if folder.name == CHECKPOINT_DIR and folder != path:
        return folder.parent
    if folder.parent.name == "export" and (folder.parent.parent / "config.yaml").is_file():
        return folder.parent.parent
    return folder


def eval_output_dir(path) -> Path:
    """Where an evaluation of ``path`` (run folder, checkpoint or export) writes: ``<run>/eval``."""
    return run_of(path) / "eval"


def locks_eval_output(fn):
    """Decorate ``run_eval(kind, path, ...)``: lock ``<run>/eval`` first (rank 0), which also
    proves it is writable before anything is computed."""
    @functools.wraps(fn)
    def wrapper(kind, path, *args, **kwargs):
        import torch.distributed as dist

        main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        out = eval_output_dir(path)
        if not main or not Path(path).exists():
            return fn(kind, path, *args, **kwargs)
        acquire(out, "eval")
        try:
            return fn(kind, path, *args, **kwargs)
        finally:
            release(out)
    return wrapper
