"""The blocking tap: the same fork as :class:`probe.tap.Tap`, for threaded (non-asyncio) hosts.

Every :class:`BlockingTap` of a process shares one background daemon thread that runs an event
loop (started on first use); ``write`` copies the chunk, stamps it with the tap's clock in the
caller's thread and hands it to that loop (``call_soon_threadsafe``: a few microseconds, never a
wait). ``open`` checks its arguments in the caller's thread (ValueError) and returns at once.

At interpreter exit, taps still open are closed (``stop`` and a normal close) with at most
:data:`EXIT_WAIT_S` seconds of waiting in all.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from probe.protocol import AudioFormat, TraceContext
from probe.tap.aio import Tap
from probe.tap.context import ForkContext
from probe.tap.core import (
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_BACKOFF_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_LAG_S,
    DEFAULT_QUEUE_S,
    DEFAULT_WARN_EVERY_S,
    TapStats,
)

__all__ = ["EXIT_WAIT_S", "BlockingTap"]

EXIT_WAIT_S = 1.0

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_open_taps: weakref.WeakSet[BlockingTap] = weakref.WeakSet()


def _shared_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="probe-tap", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


class BlockingTap:
    """A hop's fork to the probe's sink, for threads; the same arguments and behaviour as
    :class:`~probe.tap.Tap`, whose docstring says what each option does."""

    def __init__(
        self,
        sink_url: str | None = None,
        *,
        hop: str,
        queue_s: float = DEFAULT_QUEUE_S,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        backoff_s: float = DEFAULT_BACKOFF_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        warn_every_s: float = DEFAULT_WARN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._tap = Tap(
            sink_url,
            hop=hop,
            queue_s=queue_s,
            max_lag_s=max_lag_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            connect_timeout_s=connect_timeout_s,
            warn_every_s=warn_every_s,
            clock=clock,
            logger=logger,
            rng=rng,
        )
        self._clock = clock
        self._loop = _shared_loop()
        self._open = False
        self._ignored = 0  # writes with no stream open, counted in the caller's thread

    @property
    def hop(self) -> str:
        return self._tap.hop

    @property
    def stats(self) -> TapStats:
        """A snapshot of what the tap did so far."""
        stats = self._tap.stats
        stats.ignored += self._ignored
        return stats

    @property
    def is_open(self) -> bool:
        return self._open

    def open(
        self,
        session: str | None = None,
        traceparent: TraceContext | str | None = None,
        audio: AudioFormat | Mapping[str, object] | None = None,
        *,
        tracestate: str | None = None,
        sink: str | None = None,
    ) -> None:
        """Start a fork stream (see :meth:`probe.tap.Tap.open`); returns at once."""
        prepared = self._tap.prepare(
            session, traceparent, audio, tracestate=tracestate, sink=sink
        )
        self._open = True
        _open_taps.add(self)
        self._call(self._tap.start, prepared)

    def open_context(
        self, ctx: ForkContext | None, audio: AudioFormat | Mapping[str, object] | None = None
    ) -> bool:
        """:meth:`open` with what a :class:`ForkContext` knows; never raises (see
        ``Tap.open_context``): False, with one warning, when no stream could open."""
        tap = self._tap
        try:
            prepared = tap.prepare_context(ctx if ctx is not None else ForkContext(), audio)
        except ValueError as exc:
            self.close()  # the stream before this one does not go on with this one's audio
            tap._log.warning("tap of hop %r not opened: %s", tap.hop, exc)
            return False
        self._open = True
        _open_taps.add(self)
        self._call(tap.start, prepared)
        return True

    def write(self, pcm: bytes | bytearray | memoryview) -> None:
        """Queue one chunk of the hop's audio for the sink; never blocks and never raises."""
        if not self._open:
            self._ignored += 1
            return
        try:
            data = pcm if type(pcm) is bytes else memoryview(pcm).tobytes()
            self._loop.call_soon_threadsafe(self._tap.write_at, data, self._clock())
        except Exception:
            return  # the loop is gone (interpreter exit) or pcm is not bytes-like

    def close(self, timeout: float = 0.0) -> None:
        """End the stream (``stop`` and a normal close, in the background); with ``timeout``,
        wait up to that many seconds for it to end."""
        if self._open:
            self._open = False
            _open_taps.discard(self)
            self._call(self._tap.close)
        if timeout > 0:
            self.wait_closed(timeout)

    def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until every stream of this tap has ended."""
        try:
            future = asyncio.run_coroutine_threadsafe(self._tap.wait_closed(timeout), self._loop)
            future.result(timeout + 1.0)
        except Exception:
            return

    def _call(self, fn: Callable[..., Any], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: interpreter exit
            self._loop.call_soon_threadsafe(fn, *args)


@atexit.register
def _close_open_taps() -> None:
    taps = list(_open_taps)
    if not taps:
        return
    for tap in taps:
        tap.close()
    deadline = time.monotonic() + EXIT_WAIT_S
    for tap in taps:
        tap.wait_closed(max(0.01, deadline - time.monotonic()))
