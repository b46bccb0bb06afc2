"""The asyncio shell of a probe session: connect, sleep until each frame is due, send, receive
and stamp. What to send, when, and what comes back means is the sans-I/O
:class:`~probe.session.core.SessionCore` (shared with the gevent shell in
:mod:`probe.locust.session`); this module only does the I/O:

- frame n is due at t0 + n * frame length on the loop's clock; the loop sleeps until then and
  sends, never a fixed period after a send, so lateness never accumulates;
- the run clock's time when a frame is handed to the socket is its send time; messages back are
  stamped when their bytes are read off the socket (:mod:`probe.aio.wsstamp`);
- the return direction's detection runs where ``open_stream`` puts it (the sink's child process
  in a run), by default on the process's detection worker thread, which also runs the reply
  tap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from probe.aio.hopstream import DetectionWorker, HopStream
from probe.aio.wsstamp import StampedClientConnection, client_factory
from probe.measure.expect import ExpectationBook
from probe.measure.registry import SessionRegistry
from probe.protocol import AudioFormat
from probe.session.core import (
    RETURN_HOP,
    DetectStream,
    SessionCore,
    SessionRecorder,
    SourceConfig,
    new_trace_context,
    open_session,
    target_url,
)
from probe.tls import connect_ssl
from probe.wsclose import close_of

__all__ = [
    "RETURN_HOP",
    "DetectStream",
    "LocalStream",
    "SessionResult",
    "SourceConfig",
    "StreamOpener",
    "new_trace_context",
    "run_session",
    "target_url",
]


# Opens a detection stream for (hop, audio format, session).
StreamOpener = Callable[[str, AudioFormat, str], DetectStream]


class LocalStream:
    """A :class:`HopStream` run on this process's detection worker thread."""

    def __init__(
        self, registry: SessionRegistry, worker: DetectionWorker, hop: str, audio: AudioFormat,
        session: str, book: ExpectationBook | None = None,
    ) -> None:
        self._stream = HopStream(registry, hop, audio, session_hint=session, book=book)
        self._worker = worker

    def feed(self, data: bytes, arrival: float) -> None:
        self._worker.submit(self._stream.on_audio, data, arrival)

    def set_format(self, audio: AudioFormat) -> None:
        self._worker.submit(self._stream.set_format, audio)

    def close(self) -> None:
        self._worker.submit(self._stream.close)


@dataclass
class SessionResult:
    session: str
    frames_sent: int = 0
    error: str | None = None


async def run_session(
    cfg: SourceConfig,
    registry: SessionRegistry,
    worker: DetectionWorker,
    *,
    session: str,
    clock: Callable[[], float] = time.time,
    open_stream: StreamOpener | None = None,
    book: ExpectationBook | None = None,
) -> SessionResult:
    """Stream one session; every outcome ends up in ``registry`` (never raises on peer faults).

    The return direction's detection runs where ``open_stream`` puts it, by default on
    ``worker``, informed by ``book`` (fed with this session's marker sends on ``worker``'s
    thread) when given."""
    result = SessionResult(session)
    core = open_session(cfg, session, registry, clock)
    try:
        async with asyncio.timeout(cfg.connect_timeout_s):
            ws = await connect(
                core.url,
                max_size=2**22,
                open_timeout=cfg.connect_timeout_s,
                create_connection=client_factory(clock),
                ssl=connect_ssl(core.url, cfg.ca_file),
            )
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        why = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else str(exc)
        result.error = core.connect_failed(why or type(exc).__name__)
        registry.session_failed(session, result.error)
        return result
    stream: DetectStream = (
        open_stream(RETURN_HOP, core.audio, session)
        if open_stream is not None
        else LocalStream(registry, worker, RETURN_HOP, core.audio, session, book)
    )
    rec = SessionRecorder(core, registry, stream, worker.submit)
    stopped = False
    try:
        for message in core.opening():
            await ws.send(message)
        receiving = asyncio.create_task(_receive(ws, rec, clock))
        loop = asyncio.get_running_loop()
        base = loop.time()
        for n in range(core.n_frames):
            due = core.due(base, n)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiving.done():
                break
            for owed in rec.outgoing(clock()) if core.owes else ():
                await ws.send(owed)
            lag = loop.time() - due
            sent_at = clock()
            await ws.send(core.message(n))
            rec.sent(n, sent_at, lag)
            core.prepare(n + 1)
        if not receiving.done():
            await ws.send(core.closing())
            await _drain(receiving, rec, cfg)
        if receiving.done() and receiving.exception() is None:
            closed = receiving.result()
            if closed is not None:
                result.error = core.closed(*closed, rec.frames_sent)
        receiving.cancel()
        await ws.close(1000)
    except ConnectionClosed as exc:
        code, reason = close_of(exc)
        result.error = core.closed(code, reason, rec.frames_sent)
    except asyncio.CancelledError:
        # The run was stopped (a signal): the probe ended the stream, so finals still
        # pending are not owed.
        stopped = True
        raise
    finally:
        rec.close(clock(), cut=stopped)
        await ws.close()
    result.frames_sent = rec.frames_sent
    if result.error is None:
        result.error = core.incomplete(rec.frames_sent)
    registry.close_session(session, error=result.error)
    return result


async def _drain(
    receiving: asyncio.Task[tuple[int, str] | None], rec: SessionRecorder, cfg: SourceConfig
) -> None:
    """After ``stop``: wait ``drain_s`` for the target to close, or, while text results are
    still owed (an utterance without its final), up to ``settle_s``."""
    if rec.results is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(receiving), timeout=cfg.drain_s)
        return
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not receiving.done():
        waited = loop.time() - start
        limit = max(cfg.drain_s, cfg.settle_s)
        if waited >= limit or rec.settled():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(receiving), timeout=min(0.05, limit - waited))


async def _receive(
    ws: ClientConnection, rec: SessionRecorder, clock: Callable[[], float]
) -> tuple[int, str] | None:
    """Read the return direction until the target closes; return its abnormal close code."""
    now = ws.arrival if isinstance(ws, StampedClientConnection) else clock
    try:
        async for frame in ws:
            rec.received(frame, now())
    except ConnectionClosed as exc:
        return SessionCore.abnormal(*close_of(exc))
    return SessionCore.abnormal(ws.close_code, ws.close_reason)

