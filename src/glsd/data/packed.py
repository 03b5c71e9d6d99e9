"""The file list as a loader worker holds it: one buffer, not a million Python strings.

Reading an item of a ``list[str]`` writes its reference count, so a forked worker that
touches every key over an epoch ends with its own copy of every page holding them (~100 MB
for ImageNet's 1.28M keys, per worker and per rank). Strings packed in one ``bytes`` with
numpy offsets are read without a write: the pages stay shared.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Keys are str paths; a file name that is not UTF-8 holds surrogates (os.fsdecode), which
# "surrogatepass" encodes and decodes back to the same str.
_ERRORS = "surrogatepass"


class PackedStrings:
    """An immutable sequence of str stored as one UTF-8 buffer and ``(N,)`` int64 ends."""

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8", _ERRORS) for s in strings]
        self._buffer = b"".join(encoded)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} strings")
        i %= len(self)
        start = int(self._ends[i - 1]) if i else 0
        return self._buffer[start:int(self._ends[i])].decode("utf-8", _ERRORS)
