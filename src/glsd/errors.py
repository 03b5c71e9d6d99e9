"""glsd's error types: one per kind of bad input, each message naming the problem and the fix.

The command line catches :class:`GlsdError` and prints its message alone (exit code 2); any
other exception is a bug and keeps its traceback. ``--debug`` or ``GLSD_DEBUG=1`` shows the
traceback of a GlsdError too.
"""
from __future__ import annotations


class GlsdError(Exception):
    """Base of the errors glsd raises for bad input or a state it cannot continue from."""


class ConfigError(GlsdError, ValueError):
    """A config key or value is invalid; the message names it and the fix."""


class MissingSplit(ConfigError):
    """A split folder asked for is not in the data; ``key`` is the config key that asked."""

    def __init__(self, split: str, where: str, available: list[str], key: str = "data.split"):
        self.split, self.where, self.available, self.key = split, where, list(available), key
        super().__init__(f"split '{split}' not in {where}; available: {', '.join(self.available)} "
                         f"(set {key})")

    def asked_by(self, key: str) -> "MissingSplit":
        """The same error, naming the config key that asked for the split."""
        return MissingSplit(self.split, self.where, self.available, key)


class CheckpointError(GlsdError, RuntimeError):
    """A checkpoint or exported backbone is missing, corrupt, unsafe or does not fit."""


class DataError(GlsdError, RuntimeError):
    """An image or data source cannot be read (the message names the file)."""


class WorkerDied(DataError):
    """A data loader worker died mid-run (the OOM killer, a decoder crash): a failed run, not
    bad input; the message says what the run kept."""


class RankFailed(GlsdError, RuntimeError):
    """Under torchrun, another rank's write failed (rank 0 writes alone): this rank stops with it."""


class RunFolderBusy(GlsdError, RuntimeError):
    """Another process holds the run folder's lock."""


class DiskFull(GlsdError, OSError):
    """A write ran out of space; the message says which file is intact."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class NotWritable(GlsdError, OSError):
    """An output folder cannot be written (read-only, no permission); found before computing."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class OutOfMemory(GlsdError, RuntimeError):
    """Training ran out of device memory; the message says what to lower and which checkpoint
    is kept."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory error on any device: ``torch.OutOfMemoryError`` (CUDA and other
    accelerators), or the plain RuntimeError of the CPU allocator. (No torch import here.)"""
    if type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


class NonFiniteError(GlsdError, RuntimeError):
    """A training step produced a non-finite loss, gradient or weight; nothing of it was saved.
    ``cause`` ("loss", "gradients" or "weights") decides the advice."""

    def __init__(self, message: str, cause: str = "loss"):
        super().__init__(message)
        self.cause = cause


class TrainingInterrupted(BaseException):
    """SIGTERM/SIGINT stopped the run (after a checkpoint, unless a second signal stopped it at
    once): not an error, but not finished either (callers such as the study must not treat
    the run as done). A BaseException like KeyboardInterrupt, so that ``except Exception``
    (a skipped bad image, a failed study cell) never swallows it."""

    def __init__(self, message: str, signal: int = 2):
        super().__init__(message)
        self.signal = int(signal)


def short(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters for a message (reprlib: a huge value is never
    rendered whole)."""
    import reprlib

    if isinstance(value, int) and value.bit_length() > 256:  # repr() refuses past 4,300 digits
        return f"<an integer of {value.bit_length()} bits>"
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 8, 8, 3
    return r.repr(value)[:limit]
