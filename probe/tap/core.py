"""The tap's rules, sans-I/O: what a fork stream sends, what it keeps, what it drops and when it
tries again. The shells (:mod:`probe.tap.aio`, :mod:`probe.tap.blocking`) only connect, send and
sleep as these say.

Timing is the measurement (PROTOCOL.md 4: a frame's arrival at the sink is stamped when it is
received), so a frame is worth sending only close to when the host emitted it. Each frame is
queued with the time ``write`` was called; when its turn to be sent comes it is sent if it waited
at most ``max_lag_s``, and dropped and counted as *stale* otherwise. Frames written while the sink
is unreachable, or while a dropped connection is being re-opened, are therefore never sent late as
if on time: they age out. The queue is also bounded in bytes (``queue_s`` seconds of the stream's
audio); past the bound the oldest frame is dropped and counted as *full*.

No sockets, no event loop, no threads: time comes from the shell.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from probe.errors import ProtocolError
from probe.protocol import (
    AudioFormat,
    ForkStart,
    TraceContext,
    parse_audio_format,
    parse_traceparent,
    to_json,
)

__all__ = [
    "DEFAULT_BACKOFF_MAX_S",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_LAG_S",
    "DEFAULT_QUEUE_S",
    "DEFAULT_WARN_EVERY_S",
    "STABLE_S",
    "Backoff",
    "DropWarnings",
    "FrameQueue",
    "TapOptions",
    "TapStats",
    "check_hop",
    "check_sink_url",
    "fork_hello",
]

DEFAULT_QUEUE_S = 2.0
# One 20 ms frame: a frame that waited longer would inflate its hop's latency by that much.
DEFAULT_MAX_LAG_S = 0.02
DEFAULT_BACKOFF_S = 0.1
DEFAULT_BACKOFF_MAX_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_WARN_EVERY_S = 10.0
# A connection that stayed up this long resets the backoff; one the sink drops at once (a
# refused capability) keeps backing off.
STABLE_S = 2.0

_HOP = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(slots=True)
class TapStats:
    """What a tap did since it was made (every stream it opened). ``dropped`` frames never
    reached the sink: ``dropped_full`` (queue over its bound), ``dropped_stale`` (waited more
    than ``max_lag_s`` for a connection or for the socket) and ``dropped_lost`` (the connection
    was found closed under it, or the stream closed before a connection came up). ``ignored``
    counts writes with no stream open (before ``open`` or after ``close``)."""

    frames_written: int = 0
    bytes_written: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    dropped_full: int = 0
    dropped_stale: int = 0
    dropped_lost: int = 0
    dropped_bytes: int = 0
    ignored: int = 0
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    connected: bool = False
    last_error: str | None = None

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_stale + self.dropped_lost

    def snapshot(self) -> TapStats:
        """A copy that later work of the tap does not change."""
        return replace(self)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            name: getattr(self, name) for name in self.__dataclass_fields__  # noqa: SIM118
        }
        out["dropped"] = self.dropped
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TapOptions:
    """How a tap queues, ages out, reconnects and warns (seconds throughout)."""

    queue_s: float = DEFAULT_QUEUE_S
    max_lag_s: float = DEFAULT_MAX_LAG_S
    backoff_s: float = DEFAULT_BACKOFF_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    warn_every_s: float = DEFAULT_WARN_EVERY_S

    def __post_init__(self) -> None:
        bounds = (
            ("queue_s", 0.0, 600.0),
            ("max_lag_s", 0.0, 60.0),
            ("backoff_s", 0.0, 600.0),
            ("backoff_max_s", 0.0, 3600.0),
            ("connect_timeout_s", 0.0, 600.0),
            ("warn_every_s", 0.0, 86400.0),
        )
        for name, low, high in bounds:
            value = getattr(self, name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not low < value <= high
            ):
                raise ValueError(
                    f"{name} must be a number of seconds above {low:g} and at most {high:g}, "
                    f"got {value!r}."
                )
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s:g}) must be at least backoff_s "
                f"({self.backoff_s:g})."
            )


def check_hop(hop: object) -> str:
    """Return ``hop`` if it is a valid hop name (PROTOCOL.md 2.1), else raise ValueError."""
    if not isinstance(hop, str) or not _HOP.fullmatch(hop):
        raise ValueError(f"hop must be 1-64 characters of A-Z a-z 0-9 . _ -, got {hop!r}.")
    return hop


def check_sink_url(url: object, *, what: str = "sink_url") -> str:
    """Return ``url`` if it is a usable ws:// or wss:// URL, else raise ValueError (one sentence).

    The URL is used exactly as given (path and query included, PROTOCOL.md 2)."""
    if not isinstance(url, str):
        raise ValueError(f"{what} must be a ws:// or wss:// URL string, got {type(url).__name__}.")
    if not url or any(c <= " " or c == "\x7f" for c in url):
        raise ValueError(f"{what} must be a ws:// or wss:// URL without spaces, got {url!r}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"{what} is not a valid URL ({exc}): {url!r}.") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"{what} must start with ws:// or wss://, got {url!r}.")
    if not parts.hostname:
        raise ValueError(f"{what} must name a host, like ws://host:port/path, got {url!r}.")
    if parts.fragment or "#" in url:
        raise ValueError(f"{what} must not contain a #fragment, got {url!r}.")
    return url


def fork_hello(
    hop: str,
    audio: AudioFormat | Mapping[str, object],
    session: str | None = None,
    traceparent: TraceContext | str | None = None,
    tracestate: str | None = None,
) -> tuple[str, AudioFormat]:
    """The fork's ``start`` text (PROTOCOL.md 2.1) and its audio format; ValueError (one sentence)
    for a value the contract does not allow."""
    try:
        fmt = audio if isinstance(audio, AudioFormat) else parse_audio_format(dict(audio))
        ctx = (
            parse_traceparent(traceparent)
            if isinstance(traceparent, str)
            else traceparent
        )
        start = ForkStart(
            hop=hop,
            audio=fmt,
            session=session,
            traceparent=ctx,
            tracestate=tracestate if ctx is not None else None,
        )
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    except TypeError:
        raise ValueError(
            "audio must be an AudioFormat or a mapping with encoding, sample_rate and channels."
        ) from None
    return to_json(start), fmt


class FrameQueue:
    """Frames waiting to be sent, each with the time it was written; bounded in bytes."""

    __slots__ = ("_items", "limit_bytes", "max_lag_s", "queued_bytes")

    def __init__(self, limit_bytes: int, max_lag_s: float) -> None:
        self._items: deque[tuple[bytes, float]] = deque()
        self.limit_bytes = max(1, limit_bytes)
        self.max_lag_s = max_lag_s
        self.queued_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, data: bytes, t: float, stats: TapStats) -> None:
        """Queue ``data`` written at ``t``; drop the oldest frames past the bound (as stale if
        they are, else as pushed out of a full queue)."""
        self._items.append((data, t))
        self.queued_bytes += len(data)
        while self.queued_bytes > self.limit_bytes:
            old, at = self._items.popleft()
            self.queued_bytes -= len(old)
            if t - at > self.max_lag_s:
                stats.dropped_stale += 1
            else:
                stats.dropped_full += 1
            stats.dropped_bytes += len(old)

    def pop_fresh(self, now: float, stats: TapStats) -> bytes | None:
        """The oldest frame that is still fresh at ``now`` (older ones dropped as stale)."""
        while self._items:
            data, t = self._items.popleft()
            self.queued_bytes -= len(data)
            if now - t <= self.max_lag_s:
                return data
            stats.dropped_stale += 1
            stats.dropped_bytes += len(data)
        return None

    def has_fresh(self, now: float) -> bool:
        """Whether the newest frame is still fresh (frames are in write order)."""
        return bool(self._items) and now - self._items[-1][1] <= self.max_lag_s

    def drop_all(self, stats: TapStats, *, now: float) -> None:
        """Forget every frame: stale ones as stale, the rest as lost."""
        while self._items:
            data, t = self._items.popleft()
            if now - t > self.max_lag_s:
                stats.dropped_stale += 1
            else:
                stats.dropped_lost += 1
            stats.dropped_bytes += len(data)
        self.queued_bytes = 0


class Backoff:
    """Capped exponential backoff with jitter: ``base * 2**n`` up to ``cap``, each delay drawn
    from its upper half so that many taps re-opening at once (a sink restart) spread out."""

    __slots__ = ("_n", "_rng", "base", "cap")

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng or random.Random()
        self._n = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2.0 ** min(self._n, 60)))
        self._n += 1
        return delay * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self._n = 0


class DropWarnings:
    """At most one warning line per ``every`` seconds about drops and connection trouble; the
    first trouble is told at once."""

    __slots__ = ("_last_at", "_seen", "every", "hop")

    def __init__(self, hop: str, every: float) -> None:
        self.hop = hop
        self.every = every
        self._last_at: float | None = None
        self._seen = TapStats()

    def check(self, now: float, stats: TapStats) -> str | None:
        """The warning to log now, if any (call after anything that may have dropped or
        failed)."""
        seen = self._seen
        dropped = stats.dropped - seen.dropped
        failures = stats.connect_failures - seen.connect_failures
        lost = stats.disconnects - seen.disconnects
        if not (dropped or failures or lost):
            return None
        if self._last_at is not None and now - self._last_at < self.every:
            return None
        parts = []
        if dropped:
            why = ", ".join(
                f"{n} {name}"
                for name, n in (
                    ("queue full", stats.dropped_full - seen.dropped_full),
                    ("stale", stats.dropped_stale - seen.dropped_stale),
                    ("lost", stats.dropped_lost - seen.dropped_lost),
                )
                if n
            )
            parts.append(f"{_n(dropped, 'frame')} dropped ({why})")
        if failures:
            parts.append(f"{_n(failures, 'connection attempt')} failed")
        if lost:
            parts.append(f"{_n(lost, 'connection')} lost")
        since = "" if self._last_at is None else f" in the last {now - self._last_at:.0f} s"
        last = f"; last error: {stats.last_error}" if stats.last_error else ""
        self._last_at = now
        self._seen = stats.snapshot()
        return f"tap of hop {self.hop!r}: {'; '.join(parts)}{since}{last}."


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
