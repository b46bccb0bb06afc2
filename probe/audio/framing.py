"""Cutting sample streams into fixed-size frames (e.g. 20 ms packets)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError

F32 = npt.NDArray[np.float32]


def frame_samples(rate: int, frame_ms: float) -> int:
    """Samples in one frame of `frame_ms` milliseconds at `rate` Hz (must be a whole number)."""
    n = rate * frame_ms / 1000.0
    if rate <= 0 or frame_ms <= 0 or abs(n - round(n)) > 1e-9:
        raise ConfigError(
            f"A {frame_ms} ms frame at {rate} Hz is not a whole, positive number of samples."
        )
    return int(round(n))


def _check_n(n: int) -> None:
    if n <= 0:
        raise ConfigError(f"Frame size must be a positive number of samples, got {n}.")


def split_frames(x: npt.ArrayLike, n: int) -> list[F32]:
    """Split a mono signal into n-sample frames; the last one may be shorter."""
    _check_n(n)
    a = np.asarray(x, dtype=np.float32)
    return [a[i : i + n] for i in range(0, len(a), n)]


class Reframer:
    """Turn blocks of any length into complete n-sample frames, keeping the remainder."""

    def __init__(self, n: int) -> None:
        _check_n(n)
        self.n = n
        self._buf = np.zeros(0, dtype=np.float32)

    @property
    def pending(self) -> int:
        """Samples held back, waiting to complete a frame."""
        return len(self._buf)

    def push(self, block: npt.ArrayLike) -> list[F32]:
        """Add samples; returns every frame now complete, oldest first."""
        a = np.asarray(block, dtype=np.float32).ravel()
        buf = np.concatenate([self._buf, a]) if len(self._buf) else a
        whole = len(buf) - len(buf) % self.n
        frames = [buf[i : i + self.n].copy() for i in range(0, whole, self.n)]
        self._buf = buf[whole:].copy()
        return frames

    def flush(self) -> F32 | None:
        """The partial frame left over (and clear it), or None if there is none."""
        if not len(self._buf):
            return None
        rest, self._buf = self._buf, np.zeros(0, dtype=np.float32)
        return rest
