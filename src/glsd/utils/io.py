"""Atomic file writes: a kill at any moment leaves the previous file or the new one, never a
torn one (checkpoints, subset.json, evaluation and study records)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Optional

from glsd.errors import DiskFull

TMP_MARK = ".tmp-"
# torch.save reports a failed write (ENOSPC included) as a RuntimeError of its zip writer.
_WRITE_ERRORS = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then atomically replace ``path``.
    A full disk raises DiskFull ("disk full while writing ..."); ``path`` is then as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        raise_if_disk_full(e, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_copy(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source``'s bytes, atomically (streamed: a checkpoint may
    be gigabytes). Not a hard link: anyone who writes the source in place (``cp epoch.pt
    last.pt`` to roll back, a script's ``torch.save``) would rewrite the copy too."""
    with open(source, "rb") as original:
        atomic_write(target, lambda f: shutil.copyfileobj(original, f, 4 * 2**20))


def raise_if_disk_full(e: BaseException, path: Path, kept: Optional[str] = None) -> None:
    """A DiskFull naming ``path`` and what is ``kept`` (default: the previous ``path``, which an
    atomic write leaves as it was) when ``e`` comes from a full disk; else nothing."""
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left on device" in str(e)
    if not full and any(m in str(e) for m in _WRITE_ERRORS):
        try:
            full = shutil.disk_usage(path.parent).free < 64 * 2**20
        except OSError:
            full = False
    if not full or isinstance(e, DiskFull):
        return
    if kept is None:
        kept = (f"the previous {path.name} is intact" if path.exists()
                else f"no previous {path.name} existed")
    raise DiskFull(errno.ENOSPC, f"disk full while writing {path}; {kept}. Free space on "
                   f"{path.parent} (or move the run), then rerun to resume") from None


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any work
    whose result would go there is done: NotWritable naming ``what`` otherwise."""
    from glsd.errors import NotWritable

    probe = Path(folder) / f".glsd-write-check-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fix = ("a part of that path is a file, not a folder" if e.errno in (errno.ENOTDIR, errno.EEXIST)
               else "fix its permissions, free space, or choose another place")
        raise NotWritable(e.errno, f"cannot write {what} in {folder} ({e.strerror or e}); nothing "
                          f"was computed: {fix}") from None


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an advisory lock on ``path`` (waiting for it) where the OS and the file system
    lock files; elsewhere (Windows, NFS without lockd, Lustre without ``flock``, some FUSE
    mounts) hold nothing: callers must stay right unlocked, only slower (e.g. a study's
    concurrent cells then compute the same floor twice)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    handle = None
    if fcntl is not None:
        try:
            handle = open(path, "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            if handle is not None:
                handle.close()
            handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock
