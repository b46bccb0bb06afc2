"""The asyncio tap: fork the audio a hop emits to the probe's sink, from the hop's event loop.

::

    tap = Tap("ws://probe-sink:8766/sink", hop="tts")
    tap.open(session, traceparent, {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1})
    ...
    tap.write(chunk)          # as each chunk leaves the hop; never blocks, never raises
    ...
    tap.close()               # sends stop and closes normally, in the background
    await tap.wait_closed()   # optional

``open``, ``write`` and ``close`` are plain methods, called on the loop that runs the hop (they
must not be called from another thread: use :class:`probe.tap.BlockingTap` there). Each ``open``
starts one fork stream (PROTOCOL.md 2): a WebSocket to the sink URL exactly as given, a ``start``
text frame, one binary frame per ``write``, ``stop`` and a normal close. While the fork is open,
nothing is queued and the socket keeps up, ``write`` hands the frame to the socket itself (a
non-blocking write: the frame leaves at once and no task is woken; about 12 us of CPU per 640-byte
frame against 18 us through the writer task, ``benchmarks/tap_cost.py``); otherwise it queues the
frame for a writer task. What is dropped, and why, is in :mod:`probe.tap.core` and
:attr:`Tap.stats`.

If the sink cannot be reached, or drops the connection, the stream is opened again with capped
exponential backoff, with a fresh ``start`` (the sink takes every connection as a new stream of
the hop), and only when there is fresh audio to send: a hop that went quiet is not re-opened just
to be closed again as idle. Frames written meanwhile are dropped as stale rather than sent late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from probe import __version__
from probe.protocol import AudioFormat, TraceContext
from probe.tap.context import ForkContext
from probe.tap.core import (
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_BACKOFF_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_LAG_S,
    DEFAULT_QUEUE_S,
    DEFAULT_WARN_EVERY_S,
    STABLE_S,
    Backoff,
    DropWarnings,
    FrameQueue,
    TapOptions,
    TapStats,
    check_hop,
    check_sink_url,
    fork_hello,
)

__all__ = ["Tap"]

log = logging.getLogger("probe.tap")

_STOP = '{"type":"stop"}'
_CLOSE_TIMEOUT_S = 2.0
_USER_AGENT = f"probe-tap/{__version__}"
# Bytes waiting in the socket's buffer beyond which frames queue for the writer task instead.
_DIRECT_WRITE_LIMIT = 16384


def describe(exc: BaseException) -> str:
    """One phrase for why a fork connection failed or ended."""
    if isinstance(exc, ConnectionClosed):
        if exc.rcvd is None:
            return "the connection to the sink was lost (no close frame)"
        reason = f": {exc.rcvd.reason}" if exc.rcvd.reason else ""
        return f"the sink closed the fork (code {exc.rcvd.code}{reason})"
    if isinstance(exc, InvalidStatus):
        return f"the sink answered the handshake with HTTP {exc.response.status_code}"
    if isinstance(exc, TimeoutError):
        return "opening the connection to the sink timed out"
    text = str(exc) or type(exc).__name__
    return f"cannot connect to the sink ({text})"


class _Prepared:
    __slots__ = ("audio", "hello", "limit", "url")

    def __init__(self, url: str, hello: str, audio: AudioFormat, limit: int) -> None:
        self.url = url
        self.hello = hello
        self.audio = audio
        self.limit = limit


class Tap:
    """A hop's fork to the probe's sink, on asyncio (module docstring).

    ``sink_url`` may be None when each stream's ``open`` names its sink (the ``sink`` of the
    ingress ``start``). ``queue_s``: at most this many seconds of audio wait for the socket;
    ``max_lag_s``: a frame that waited longer is dropped, not sent late; ``backoff_s`` /
    ``backoff_max_s``: the first and the longest wait before re-opening; ``warn_every_s``: at
    most one warning line that often. ``clock`` (seconds, monotonic) times the waits. A value
    out of range raises ValueError (one sentence): that is setup, not the audio path.
    """

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
        self.hop = check_hop(hop)
        self.sink_url = None if sink_url is None else check_sink_url(sink_url)
        self.options = TapOptions(
            queue_s=queue_s,
            max_lag_s=max_lag_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            connect_timeout_s=connect_timeout_s,
            warn_every_s=warn_every_s,
        )
        self._clock = clock
        self._log = logger or log
        self._rng = rng or random.Random()
        self._stats = TapStats()
        self._warnings = DropWarnings(self.hop, warn_every_s)
        self._stream: _Stream | None = None
        self._streams: set[_Stream] = set()

    @property
    def stats(self) -> TapStats:
        """A snapshot of what the tap did so far (all its streams)."""
        return self._stats.snapshot()

    @property
    def is_open(self) -> bool:
        return self._stream is not None

    def prepare(
        self,
        session: str | None = None,
        traceparent: TraceContext | str | None = None,
        audio: AudioFormat | Mapping[str, object] | None = None,
        *,
        tracestate: str | None = None,
        sink: str | None = None,
    ) -> _Prepared:
        """Check a stream's arguments (ValueError, one sentence) without opening it."""
        url = self.sink_url if sink is None else check_sink_url(sink, what="sink")
        if url is None:
            raise ValueError(
                f"the tap of hop {self.hop!r} has no sink URL: give one to Tap() or to open()."
            )
        if audio is None:
            raise ValueError("open() needs the audio format of what the hop emits.")
        hello, fmt = fork_hello(self.hop, audio, session, traceparent, tracestate)
        limit = int(self.options.queue_s * fmt.sample_rate * fmt.frame_width)
        return _Prepared(url, hello, fmt, limit)

    def open(
        self,
        session: str | None = None,
        traceparent: TraceContext | str | None = None,
        audio: AudioFormat | Mapping[str, object] | None = None,
        *,
        tracestate: str | None = None,
        sink: str | None = None,
    ) -> None:
        """Start a fork stream (ending the current one, if any) from the running loop.

        ``session`` and ``traceparent`` (the hop's own span context) may be None when unknown;
        ``audio`` is the format of what ``write`` will get; ``sink`` overrides the tap's URL
        for this stream."""
        self.start(self.prepare(session, traceparent, audio, tracestate=tracestate, sink=sink))

    def open_context(
        self, ctx: ForkContext | None, audio: AudioFormat | Mapping[str, object] | None = None
    ) -> bool:
        """:meth:`open` with what a :class:`ForkContext` knows (a child span of its caller's
        trace context, unless it is the hop's own OTel span); ``audio`` defaults to its own.

        The context comes from a stream the hop does not own, so nothing is raised: with no sink
        (neither the context's nor the tap's) or no audio format, this logs one warning and
        returns False, and later writes do nothing. True when a stream opened."""
        ctx = ctx if ctx is not None else ForkContext()
        try:
            self.start(self.prepare_context(ctx, audio))
        except ValueError as exc:
            self.close()  # the stream before this one does not go on with this one's audio
            self._stats.last_error = str(exc)
            self._log.warning("tap of hop %r not opened: %s", self.hop, exc)
            return False
        return True

    def prepare_context(
        self, ctx: ForkContext, audio: AudioFormat | Mapping[str, object] | None = None
    ) -> _Prepared:
        """:meth:`prepare` from a :class:`ForkContext` (ValueError, one sentence)."""
        return self.prepare(
            ctx.session,
            ctx.hop_traceparent(),
            audio if audio is not None else ctx.audio,
            tracestate=ctx.tracestate,
            sink=ctx.sink if ctx.sink is not None and self.sink_url is None else None,
        )

    def start(self, prepared: _Prepared) -> None:
        """Open a stream from :meth:`prepare`'s result (on the loop's thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "Tap.open() must be called on a running event loop; use BlockingTap from "
                "threads."
            ) from None
        self.close()
        stream = _Stream(self, prepared, loop)
        self._stream = stream
        self._streams.add(stream)

    def write(self, pcm: bytes | bytearray | memoryview) -> None:
        """Queue one chunk of the hop's audio for the sink; never blocks and never raises.

        Any bytes-like object works (it is copied). With no stream open, it does nothing."""
        try:
            data = pcm if type(pcm) is bytes else memoryview(pcm).tobytes()
        except Exception as exc:
            self._stats.ignored += 1
            self._stats.last_error = f"write() takes bytes, not {type(pcm).__name__} ({exc})"
            return
        self.write_at(data, self._clock())

    def write_at(self, data: bytes, t: float) -> None:
        """``write`` of bytes the caller will not change, written at ``t`` on the tap's clock."""
        stream = self._stream
        stats = self._stats
        if stream is None:
            stats.ignored += 1
            return
        if not data:
            return
        try:
            stats.frames_written += 1
            stats.bytes_written += len(data)
            if stream.send_now(data):
                return
            full = stats.dropped_full
            stream.queue.push(data, t, stats)
            stream.wake.set()
            if stats.dropped_full != full:
                self._check_warnings()
        except Exception as exc:  # a closed loop at shutdown: the write is lost, not raised
            stats.dropped_lost += 1
            stats.last_error = f"write failed ({exc or type(exc).__name__})"

    def close(self) -> None:
        """End the current stream: what is queued and fresh is sent, then ``stop`` and a normal
        close, in the background. Later writes do nothing until the next ``open``."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.finish()

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until every stream this tap opened has ended (at most ``timeout`` seconds)."""
        tasks = [s.task for s in self._streams]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def aclose(self, timeout: float | None = 5.0) -> None:
        """``close`` and ``wait_closed``."""
        self.close()
        await self.wait_closed(timeout)

    def _check_warnings(self) -> None:
        message = self._warnings.check(self._clock(), self._stats)
        if message is not None:
            self._log.warning("%s", message)

    def _ended(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        if self._stream is stream:
            self._stream = None


class _Stream:
    """One fork stream: its queue and the task that connects and sends."""

    def __init__(self, tap: Tap, prepared: _Prepared, loop: asyncio.AbstractEventLoop) -> None:
        self.tap = tap
        self.url = prepared.url
        self.hello = prepared.hello
        self.queue = FrameQueue(prepared.limit, tap.options.max_lag_s)
        self.wake = asyncio.Event()
        self.closing = asyncio.Event()
        self.attempts = 0
        self.ws: ClientConnection | None = None  # open, start sent
        self.sending = False  # the writer task is inside ws.send
        self.task = loop.create_task(self._run(), name=f"probe-tap {tap.hop}")

    def finish(self) -> None:
        self.closing.set()
        self.wake.set()

    def send_now(self, data: bytes) -> bool:
        """Hand ``data`` to the socket at once if the fork is open, nothing waits before it and
        the socket keeps up (what ``ws.send`` does when it need not wait, without waking the
        writer task: about half the CPU per frame); False to queue it instead."""
        ws = self.ws
        if (
            ws is None
            or self.sending
            or self.queue
            or ws.protocol.state is not State.OPEN
            or ws.transport.get_write_buffer_size() > _DIRECT_WRITE_LIMIT
        ):
            return False
        try:
            ws.protocol.send_binary(data)
            ws.send_data()
        except Exception:
            return False  # the writer task finds out what happened to the connection
        stats = self.tap._stats
        stats.frames_sent += 1
        stats.bytes_sent += len(data)
        return True

    async def _run(self) -> None:
        tap = self.tap
        stats = tap._stats
        clock = tap._clock
        backoff = Backoff(tap.options.backoff_s, tap.options.backoff_max_s, tap._rng)
        try:
            while True:
                if self.attempts and not await self._ready_to_retry(backoff.next()):
                    return
                ws = await self._connect()
                if ws is None:
                    if self.closing.is_set():
                        return
                    continue
                up_at = clock()
                try:
                    await self._pump(ws)
                    return
                except ConnectionClosed as exc:
                    stats.disconnects += 1
                    stats.last_error = describe(exc)
                    if clock() - up_at >= STABLE_S:
                        backoff.reset()
                    tap._check_warnings()
                finally:
                    stats.connected = False
                    if ws.state is not State.CLOSED:
                        ws.transport.abort()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours must not reach the host
            stats.last_error = f"the tap failed: {exc!r}"
            tap._log.error("tap of hop %r failed; its fork ends", tap.hop, exc_info=exc)
        finally:
            self.queue.drop_all(stats, now=clock())
            stats.connected = False
            tap._ended(self)

    async def _ready_to_retry(self, delay: float) -> bool:
        """Wait out the backoff, then for fresh audio; False if the stream closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), delay)
        clock = self.tap._clock
        while not self.closing.is_set():
            self.wake.clear()
            if self.queue.has_fresh(clock()):
                return True
            await self.wake.wait()
        return False

    async def _connect(self) -> ClientConnection | None:
        tap = self.tap
        stats = tap._stats
        self.attempts += 1
        try:
            ws = await connect(
                self.url,
                compression=None,
                proxy=None,
                open_timeout=tap.options.connect_timeout_s,
                close_timeout=_CLOSE_TIMEOUT_S,
                max_queue=4,
                user_agent_header=_USER_AGENT,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stats.connect_failures += 1
            stats.last_error = describe(exc)
            tap._check_warnings()
            return None
        stats.connects += 1
        if self.attempts > 1:
            stats.reconnects += 1
            tap._log.info(
                "tap of hop %r: fork to %s open again after %d attempts",
                tap.hop, self.url, self.attempts,
            )
        return ws

    async def _pump(self, ws: ClientConnection) -> None:
        tap = self.tap
        stats = tap._stats
        clock = tap._clock
        queue = self.queue
        await ws.send(self.hello)
        stats.connected = True
        # A sink that closes the fork while the hop is quiet wakes the writer to notice.
        watcher = asyncio.ensure_future(ws.wait_closed())
        watcher.add_done_callback(lambda _: self.wake.set())
        self.ws = ws
        try:
            while True:
                self.wake.clear()
                stale = stats.dropped_stale
                data = queue.pop_fresh(clock(), stats)
                if stats.dropped_stale != stale:
                    tap._check_warnings()
                if data is None:
                    if self.closing.is_set():
                        self.ws = None
                        await ws.send(_STOP)
                        await ws.close(1000)
                        return
                    if ws.state is not State.OPEN:
                        raise ws.close_exc
                    await self.wake.wait()
                    continue
                self.sending = True
                try:
                    await ws.send(data)
                except ConnectionClosed:
                    stats.dropped_lost += 1
                    stats.dropped_bytes += len(data)
                    raise
                finally:
                    self.sending = False
                stats.frames_sent += 1
                stats.bytes_sent += len(data)
        finally:
            self.ws = None
            watcher.cancel()
