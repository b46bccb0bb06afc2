"""How much of a core this process used since the last reading (for the generator's health)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["CpuShare"]


class CpuShare:
    """Each :meth:`read` returns the share of one core the process used since the previous
    read (or since it was made): process CPU time over wall time."""

    def __init__(
        self,
        cpu: Callable[[], float] = time.process_time,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cpu, self._wall = cpu, wall
        self._last = (cpu(), wall())

    def elapsed(self) -> float:
        """Wall seconds since the last read."""
        return self._wall() - self._last[1]

    def read(self) -> float:
        now = (self._cpu(), self._wall())
        share = (now[0] - self._last[0]) / max(1e-6, now[1] - self._last[1])
        self._last = now
        return share
