"""The gevent shell of a probe session over :mod:`probe.locust.wsconn` (websockets' sans-I/O client
protocol on a gevent socket).

What to send, when, and what comes back means is the sans-I/O
:class:`~probe.session.core.SessionCore` (shared with the asyncio shell in :mod:`probe.aio.source`);
this module only connects, sleeps, sends, receives and stamps:

- frame n is due at t0 + n * frame length on an absolute schedule; the greenlet sleeps until the
  due time and sends, never a fixed period after a send (PROTOCOL.md section 4); in the open model
  (``from_intended``) a marker's send time is its frame's *due* time plus its offset, so a late
  probe adds its lateness to the latency instead of hiding it (no coordinated omission);
- messages back are stamped when their bytes are read off the socket and handed to the
  recorder right there, in the session's receiving greenlet; their markers are detected in the
  engine's sink child process (:meth:`~probe.aio.sinkproc.SinkChild.open_stream`), and reply
  mode's tap runs inline.

Every outcome ends up in the registry; :class:`SessionOutcome` adds the connect time, for Locust.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
from gevent import GreenletExit
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from probe.locust.wsconn import GeventClient, open_client
from probe.session.core import (
    RETURN_HOP,
    SessionCore,
    SessionRecorder,
    SourceConfig,
    open_session,
)
from probe.tls import connect_ssl
from probe.wsclose import close_of

if TYPE_CHECKING:
    from probe.locust.engine import ProbeEngine

__all__ = ["SessionOutcome", "run_session"]


@dataclass
class SessionOutcome:
    """How a session went: connect time (None when it never connected), frames, error."""

    session: str
    connect_s: float | None = None
    frames_sent: int = 0
    frames_total: int = 0
    error: str | None = None
    duration_s: float = 0.0


def run_session(
    cfg: SourceConfig,
    engine: ProbeEngine,
    *,
    session: str,
    intended_start: float | None = None,
    from_intended: bool = False,
    monotonic: Callable[[], float] = time.monotonic,
    on_connect: Callable[[SessionOutcome], None] | None = None,
) -> SessionOutcome:
    """Stream one session from the calling greenlet; never raises on peer faults.

    ``intended_start`` (``monotonic`` seconds) is when the open model scheduled the session: the
    frame schedule starts there even if the greenlet runs late. ``on_connect`` hears the outcome
    of the connect (``connect_s`` set, or ``error``) as soon as it is known."""
    registry, clock = engine.registry, engine.clock
    out = SessionOutcome(session)
    t_begin = monotonic()
    core = open_session(cfg, session, registry, clock)
    out.frames_total = core.n_frames
    t_connect = monotonic()
    try:
        ws = open_client(
            core.url,
            clock=clock,
            open_timeout=cfg.connect_timeout_s,
            max_size=2**22,
            close_timeout=2,
            ssl_context=connect_ssl(core.url, cfg.ca_file),
        )
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        why = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else str(exc)
        out.error = core.connect_failed(why or type(exc).__name__)
        registry.session_failed(session, out.error)
        out.duration_s = monotonic() - t_begin
        if on_connect is not None:
            on_connect(out)
        return out
    out.connect_s = monotonic() - t_connect
    if on_connect is not None:
        on_connect(out)
    rec = SessionRecorder(
        core, registry, engine.sink.open_stream(RETURN_HOP, core.audio, session), _inline
    )
    receiving: Any = None
    stopped = False
    try:
        for opening in core.opening():
            ws.send(opening)
        receiving = gevent.spawn(_receive, ws, rec)
        core.prepare(0)
        base = monotonic() if intended_start is None else intended_start
        for n in range(core.n_frames):
            due = core.due(base, n)
            delay = due - monotonic()
            if delay > 0:
                gevent.sleep(delay)
            if receiving.ready():
                break
            for owed in rec.outgoing(clock()) if core.owes else ():
                ws.send(owed)
            message = core.message(n)
            lag = monotonic() - due
            sent_at = clock()
            ws.send(message)
            rec.sent(n, sent_at, lag, from_intended=from_intended)
            core.prepare(n + 1)
        if not receiving.ready():
            ws.send(core.closing())
            _drain(receiving, rec, cfg, monotonic)
        if receiving.ready() and receiving.successful():
            closed: tuple[int, str] | None = receiving.value
            if closed is not None:
                out.error = core.closed(closed[0], closed[1], rec.frames_sent)
        ws.close(1000)
    except ConnectionClosed as exc:
        code, reason = close_of(exc)
        out.error = core.closed(code, reason, rec.frames_sent)
    except OSError as exc:
        out.error = core.broken(rec.frames_sent, str(exc))
    except GreenletExit:
        # Locust stopped the user mid-session: the probe ended it, not the target. Markers
        # already sent still settle; those never sent are not owed, nor are finals still
        # pending.
        stopped = True
        registry.close_session(session)
        raise
    finally:
        if receiving is not None:
            # Ended before close() below reads the peer's close reply itself (a stopped user's
            # connection still gets a closing handshake, bounded by the close timeout).
            receiving.kill(block=True, timeout=1.0)
        rec.close(clock(), cut=stopped)
        ws.close()
    out.frames_sent = rec.frames_sent
    if out.error is None:
        out.error = core.incomplete(rec.frames_sent)
    registry.close_session(session, error=out.error)
    out.duration_s = monotonic() - t_begin
    return out


def _drain(receiving: Any, rec: SessionRecorder, cfg: SourceConfig,
           monotonic: Callable[[], float]) -> None:
    """After ``stop``: wait ``drain_s`` for the target to close, or, while text results are
    still owed, up to ``settle_s``."""
    if rec.results is None:
        receiving.join(timeout=cfg.drain_s)
        return
    start = monotonic()
    while not receiving.ready():
        waited = monotonic() - start
        limit = max(cfg.drain_s, cfg.settle_s)
        if waited >= limit or rec.settled():
            return
        receiving.join(timeout=min(0.05, limit - waited))


def _inline(fn: Callable[..., object], *args: object) -> None:
    fn(*args)


def _receive(ws: GeventClient, rec: SessionRecorder) -> tuple[int, str] | None:
    """Read the return direction until the target closes (a normal close too); return its
    abnormal close code. Each message reaches the recorder stamped when its bytes were read."""
    return SessionCore.abnormal(*close_of(ws.receive(rec.received)))
