"""Records a finished run's report lists, kept on disk while the run goes on.

A ``probe run`` report lists every marker on every hop (``series``) and takes its percentiles from
every latency and send lag. Held as Python objects for the whole run, they made the probe's memory
grow with the run's length (about 300 B per series row, 8 B per frame's send lag, measured in
``benchmarks/soak.py``). A :class:`Spool` keeps fixed-size numpy records instead: the latest few
thousand in memory, the rest appended to an anonymous temporary file (made in the temp directory
and unlinked at once, so nothing is left behind, even when the process is killed), and read back
as a read-only memory map when the report is built and written. Pure: no sockets, no event loop;
not thread-safe (the registry's lock guards it).
"""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["SERIES_DTYPE", "Spool"]

# One series row: hop and session as indexes into the registry's name tables; outcome 0 detected,
# 1 missed, 2 unmeasured (arrival, latency and score are 0 for a miss).
SERIES_DTYPE = np.dtype(
    [
        ("hop", "<u2"),
        ("outcome", "u1"),
        ("session", "<u4"),
        ("seq", "<i8"),
        ("send", "<f8"),
        ("arrival", "<f8"),
        ("latency", "<f8"),
        ("score", "<f8"),
    ]
)

_CHUNK_BYTES = 64 * 1024


class Spool:
    """An append-only column of numpy records (``dtype``): appended in memory a chunk at a time,
    each full chunk written to an unlinked temporary file (in ``directory``, default the temp
    directory), which is closed when the spool is closed or collected."""

    __slots__ = ("__weakref__", "_buf", "_closer", "_dir", "_fd", "_held", "_written", "dtype")

    def __init__(self, dtype: npt.DTypeLike, *, directory: str | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self._buf: npt.NDArray[Any] = np.empty(
            max(1, _CHUNK_BYTES // self.dtype.itemsize), dtype=self.dtype
        )
        self._held = 0
        self._written = 0
        self._fd: int | None = None
        self._dir = directory
        self._closer: weakref.finalize[Any, Any] | None = None

    def __len__(self) -> int:
        return self._written + self._held

    def append(self, row: Any) -> None:
        """Add one record (a tuple in the dtype's field order, or a scalar for a plain dtype)."""
        if self._held == len(self._buf):
            self._flush()
        self._buf[self._held] = row
        self._held += 1

    def _flush(self) -> None:
        if not self._held:
            return
        if self._fd is None:
            fd, path = tempfile.mkstemp(prefix="probe-spool-", dir=self._dir)
            os.unlink(path)  # nothing to clean up later, whatever ends the process
            self._fd = fd
            self._closer = weakref.finalize(self, os.close, fd)
        data = memoryview(self._buf[: self._held].tobytes())
        offset = self._written * self.dtype.itemsize
        while data:
            n = os.pwrite(self._fd, data, offset)
            data, offset = data[n:], offset + n
        self._written += self._held
        self._held = 0

    def view(self, n: int | None = None) -> npt.NDArray[Any]:
        """The first ``n`` records (all of them by default), read-only. Those on disk are a memory
        map of the file (page cache, not the process's own memory); later appends do not change
        what a view shows."""
        count = len(self) if n is None else min(n, len(self))
        if self._written and count > self._written:
            self._flush()
        if count <= self._written and self._fd is not None and count:
            mm = mmap.mmap(self._fd, count * self.dtype.itemsize, access=mmap.ACCESS_READ)
            out: npt.NDArray[Any] = np.frombuffer(mm, dtype=self.dtype, count=count)
            return out
        out = self._buf[:count].copy()
        out.flags.writeable = False
        return out

    def close(self) -> None:
        """Drop every record and close the file (views already taken stay readable)."""
        if self._closer is not None:
            self._closer()
        self._fd = None
        self._closer = None
        self._held = 0
        self._written = 0
