"""Exact latency statistics: every value kept (seconds), quantiles and a millisecond summary.

Values are kept, not bucketed, so the report's p99.9 is the sample's own p99.9; histograms for
dashboards are the telemetry layer's business. Quantiles interpolate linearly between order
statistics (numpy's default), so they agree with ``numpy.quantile`` on the same values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError

__all__ = ["SUMMARY_KEYS", "LatencyStats", "MicrosecondCounts", "summarize_ms"]

F64 = npt.NDArray[np.float64]

SUMMARY_KEYS = ("p50", "p90", "p95", "p99", "p999", "max", "mean", "count")
_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
_INITIAL_CAPACITY = 64


def _check_q(q: float) -> None:
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"A quantile is between 0 and 1, got {q}.")


def _summary(values: F64) -> dict[str, float | int | None]:
    if len(values) == 0:
        out: dict[str, float | int | None] = {k: None for k in SUMMARY_KEYS}
        out["count"] = 0
        return out
    qs = np.quantile(values, _QUANTILES)
    out = {
        key: round(float(v) * 1000.0, 3)
        for key, v in zip(("p50", "p90", "p95", "p99", "p999"), qs, strict=True)
    }
    out["max"] = round(float(values.max()) * 1000.0, 3)
    out["mean"] = round(float(values.mean()) * 1000.0, 3)
    out["count"] = int(len(values))
    return out


def summarize_ms(values: Iterable[float]) -> dict[str, float | int | None]:
    """Summary of latencies given in seconds: p50, p90, p95, p99, p999, max, mean in ms (rounded
    to 0.001) and count; an empty input gives count 0 and None for the rest."""
    if isinstance(values, np.ndarray):
        return _summary(np.asarray(values, dtype=np.float64).ravel())
    return _summary(np.fromiter((float(v) for v in values), dtype=np.float64))


class LatencyStats:
    """A growable numpy buffer of latencies in seconds. Not thread-safe: guard it with its owner's
    lock."""

    __slots__ = ("_buf", "_n")

    def __init__(self, values: Iterable[float] = ()) -> None:
        self._buf: F64 = np.empty(_INITIAL_CAPACITY, dtype=np.float64)
        self._n = 0
        self.extend(values)

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        if need <= len(self._buf):
            return
        capacity = max(need, 2 * len(self._buf))
        grown = np.empty(capacity, dtype=np.float64)
        grown[: self._n] = self._buf[: self._n]
        self._buf = grown

    @property
    def count(self) -> int:
        """How many values are held."""
        return self._n

    def __len__(self) -> int:
        return self._n

    def values(self) -> F64:
        """A copy of the values, in the order they were added."""
        return self._buf[: self._n].copy()

    def add(self, value: float) -> None:
        """Add one latency in seconds."""
        self._reserve(1)
        self._buf[self._n] = float(value)
        self._n += 1

    def extend(self, values: Iterable[float]) -> None:
        """Add many latencies in seconds."""
        if isinstance(values, np.ndarray):
            a = np.asarray(values, dtype=np.float64).ravel()
        else:
            a = np.fromiter((float(v) for v in values), dtype=np.float64)
        self._reserve(len(a))
        self._buf[self._n : self._n + len(a)] = a
        self._n += len(a)

    def merge(self, other: LatencyStats) -> None:
        """Add every value of ``other`` (which may be this very object)."""
        a = other.values()
        self._reserve(len(a))
        self._buf[self._n : self._n + len(a)] = a
        self._n += len(a)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 <= q <= 1) in seconds, or None when there are no values."""
        _check_q(q)
        if self._n == 0:
            return None
        return float(np.quantile(self._buf[: self._n], q))

    def summary_ms(self) -> dict[str, float | int | None]:
        """Same as :func:`summarize_ms` over the values held."""
        return _summary(self._buf[: self._n])

    def to_list(self) -> list[float]:
        """The values as plain floats (seconds), for shipping between processes."""
        return [float(v) for v in self._buf[: self._n]]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> LatencyStats:
        """Inverse of :meth:`to_list`."""
        return cls(values)


class MicrosecondCounts:
    """Latencies counted at 1 us resolution (seconds in, like :class:`LatencyStats`).

    Quantiles interpolate between order statistics as ``numpy.quantile`` does, on the values
    rounded to the microsecond: exact to the 0.001 ms a table shows. Counts live in blocks of
    1024 microseconds (4 KiB each, made when a value first falls in them), so memory grows with
    the span the values cover, never with how many there are: a load test keeps every hop's
    latencies for hours in a few hundred KiB (a dict of distinct microseconds took about 100 B
    per value seen, and a long run keeps seeing new ones). Not thread-safe."""

    __slots__ = ("_blocks", "_n", "_sum_us")

    _SHIFT = 10
    _MASK = (1 << _SHIFT) - 1

    def __init__(self, values: Iterable[float] = ()) -> None:
        self._blocks: dict[int, npt.NDArray[np.uint32]] = {}
        self._n = 0
        self._sum_us = 0
        self.extend(values)

    @property
    def count(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes held by the counters."""
        return sum(b.nbytes for b in self._blocks.values())

    def add(self, value: float) -> None:
        us = int(round(float(value) * 1e6))
        block = self._blocks.get(us >> self._SHIFT)
        if block is None:
            block = self._blocks[us >> self._SHIFT] = np.zeros(1 << self._SHIFT, np.uint32)
        block[us & self._MASK] += 1
        self._n += 1
        self._sum_us += us

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self.add(v)

    def _sorted(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The distinct values (us) in order and the running count up to each."""
        starts = sorted(self._blocks)
        counts = np.concatenate([self._blocks[b] for b in starts]).astype(np.int64)
        base = np.repeat(np.array(starts, dtype=np.int64) << self._SHIFT, 1 << self._SHIFT)
        values = base + np.tile(np.arange(1 << self._SHIFT, dtype=np.int64), len(starts))
        held = counts > 0
        return values[held], np.cumsum(counts[held])

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, or None when there are no values."""
        _check_q(q)
        if self._n == 0:
            return None
        keys, cum = self._sorted()
        return self._at(keys, cum, q) / 1e6

    def _at(self, keys: npt.NDArray[np.int64], cum: npt.NDArray[np.int64], q: float) -> float:
        pos = q * (self._n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, self._n - 1)
        v_lo = float(keys[int(np.searchsorted(cum, lo, side="right"))])
        v_hi = float(keys[int(np.searchsorted(cum, hi, side="right"))])
        return v_lo + (v_hi - v_lo) * (pos - lo)

    def summary_ms(self) -> dict[str, float | int | None]:
        """The summary :func:`summarize_ms` gives (values rounded to the microsecond)."""
        if self._n == 0:
            out: dict[str, float | int | None] = {k: None for k in SUMMARY_KEYS}
            out["count"] = 0
            return out
        keys, cum = self._sorted()
        out = {
            key: round(self._at(keys, cum, q) / 1000.0, 3)
            for key, q in zip(("p50", "p90", "p95", "p99", "p999"), _QUANTILES, strict=True)
        }
        out["max"] = round(float(keys[-1]) / 1000.0, 3)
        out["mean"] = round(self._sum_us / self._n / 1000.0, 3)
        out["count"] = self._n
        return out
