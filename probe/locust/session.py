"""One probe session streamed with gevent: the ``websockets`` sync client under monkey patching.

The same session as :func:`probe.source.run_session` (same carrier, embedder, protocol builders and
registry calls), with gevent's cooperative I/O instead of asyncio:

- frame n is due at t0 + n * frame length on an absolute schedule; the greenlet sleeps until the
  due time and sends, never a fixed period after a send (PROTOCOL.md section 4);
- a marker's send time is the time its frame was handed to the socket plus its offset in the frame
  over the rate, or, in the open model (``from_intended``), the frame's *intended* send time plus
  that offset, so a late probe adds its lateness to the latency instead of hiding it (no
  coordinated omission); each frame's lag (actual minus due) is recorded either way;
- the return direction is read by a second greenlet; its markers are detected in the engine's
  sink child process (:meth:`~probe.sinkproc.SinkChild.open_stream`), not in this process.

Every outcome ends up in the registry; :class:`SessionOutcome` adds the connect time, for Locust.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
from gevent import GreenletExit
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from probe.locust.frames import SessionFrames, shared_carrier
from probe.protocol import (
    Audio,
    AudioFormat,
    IngressStart,
    ProtocolViolation,
    ReturnReceiver,
    Started,
    Stop,
    TraceContext,
    to_json,
)
from probe.protocol.twilio import TwilioReturnReceiver, TwilioSender
from probe.sinkproc import RemoteStream
from probe.source import (
    RETURN_HOP,
    SourceConfig,
    _closed_message,
    new_trace_context,
    target_url,
)
from probe.watermark.embed import marker_positions

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
    registry.open_session(session)
    shared = shared_carrier(cfg.fixture, cfg.rate, cfg.duration_s, cfg.encoding, cfg.level_db)
    positions = marker_positions(len(shared.samples), cfg.rate, every_s=cfg.every_s)
    payloads = [registry.payload_for(session, i) for i in range(len(positions))]
    frame_len = max(1, int(round(cfg.frame_ms * cfg.rate / 1000)))
    # The shared carrier's bytes, with each marker's frames made just before they are due.
    frames = SessionFrames(shared, frame_len, positions, payloads)
    n_frames = frames.n_frames
    out.frames_total = n_frames
    marker_at: dict[int, list[tuple[int, int]]] = {}
    for p in frames.placements:
        marker_at.setdefault(p.sample // frame_len, []).append((p.index, p.sample % frame_len))
    audio = AudioFormat(cfg.encoding, cfg.rate, 1)
    url = target_url(cfg.target, session)
    ctx: TraceContext | None = None
    if registry.observer is not None:
        ctx = registry.observer.session_started(session, url, clock())
    if ctx is None:
        ctx = new_trace_context()
    t_connect = monotonic()
    try:
        ws = connect(
            url,
            legacy=True,
            open_timeout=cfg.connect_timeout_s,
            max_size=2**22,
            compression=None,
            ping_interval=None,
            close_timeout=2,
            proxy=None,
        )
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        why = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else str(exc)
        out.error = f"cannot connect to {url}: {why or type(exc).__name__}"
        registry.session_failed(session, out.error)
        out.duration_s = monotonic() - t_begin
        if on_connect is not None:
            on_connect(out)
        return out
    out.connect_s = monotonic() - t_connect
    if on_connect is not None:
        on_connect(out)
    stream = engine.sink.open_stream(RETURN_HOP, audio, session)
    twilio: TwilioSender | None = None
    receiving: Any = None
    try:
        if cfg.dialect == "twilio":
            twilio = TwilioSender(
                "MZ" + secrets.token_hex(16),
                "CA" + secrets.token_hex(16),
                session,
                ctx,
                sink=cfg.sink_url,
                meta=cfg.meta or None,
            )
            ws.send(twilio.connected())
            ws.send(twilio.start())
        else:
            start = IngressStart(
                session=session, traceparent=ctx, audio=audio, sink=cfg.sink_url, meta=cfg.meta
            )
            ws.send(to_json(start))
        receiving = gevent.spawn(
            _receive, ws, engine, stream, session, audio, twilio.stream_sid if twilio else None
        )
        frame_s = frame_len / cfg.rate
        frames.prepare(0)
        base = monotonic() if intended_start is None else intended_start
        for n in range(n_frames):
            due = base + n * frame_s
            delay = due - monotonic()
            if delay > 0:
                gevent.sleep(delay)
            if receiving.ready():
                break
            payload = frames.frame(n)
            now = monotonic()
            sent_at = clock()
            lag = max(0.0, now - due)
            if twilio is not None:
                ws.send(twilio.media(payload))
            else:
                ws.send(payload)
            out.frames_sent += 1
            registry.record_send_lag(session, lag)
            marks = marker_at.get(n)
            if marks:
                t_frame = sent_at - lag if from_intended else sent_at
                for index, offset in marks:
                    registry.record_send(session, index, t_frame + offset / cfg.rate)
            frames.prepare(n + 1)
        if not receiving.ready():
            ws.send(twilio.stop() if twilio is not None else to_json(Stop()))
            receiving.join(timeout=cfg.drain_s)
        if receiving.ready() and receiving.successful():
            closed = receiving.value
            if closed is not None:
                code, reason = closed
                out.error = _closed_message(code, reason, out.frames_sent, frame_len, cfg.rate)
        ws.close(1000)
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        out.error = _closed_message(code, reason, out.frames_sent, frame_len, cfg.rate)
    except OSError as exc:
        out.error = f"the connection to {url} failed after {out.frames_sent} frames: {exc}"
    except GreenletExit:
        # Locust stopped the user mid-session: the probe ended it, not the target. Markers
        # already sent still settle; those never sent are not owed.
        registry.close_session(session)
        raise
    finally:
        if receiving is not None:
            receiving.kill(block=False)
        stream.close()
        ws.close()
    if out.error is None and out.frames_sent < n_frames:
        out.error = f"stream ended after {out.frames_sent} of {n_frames} frames"
    registry.close_session(session, error=out.error)
    out.duration_s = monotonic() - t_begin
    return out


def _receive(
    ws: ClientConnection,
    engine: ProbeEngine,
    stream: RemoteStream,
    session: str,
    audio: AudioFormat,
    twilio_sid: str | None,
) -> tuple[int, str] | None:
    """Read the return direction until the target closes; return its abnormal close code."""
    registry, clock = engine.registry, engine.clock
    plain = ReturnReceiver(audio)
    tw = TwilioReturnReceiver(twilio_sid) if twilio_sid is not None else None
    heard = False
    try:
        for frame in ws:
            arrival = clock()
            try:
                if tw is not None:
                    events: list[object] = list(
                        tw.receive_binary(frame)
                        if isinstance(frame, bytes)
                        else tw.receive_text(frame)
                    )
                else:
                    events = list(
                        plain.receive_binary(frame)
                        if isinstance(frame, bytes)
                        else plain.receive_text(frame)
                    )
            except ProtocolViolation as exc:
                registry.hop_error(RETURN_HOP, session, exc.reason)
                continue
            for ev in events:
                if isinstance(ev, Audio):
                    if not heard:
                        # Audio comes back, so the return direction owes every marker.
                        heard = True
                        registry.hop_connected(RETURN_HOP, session)
                    stream.feed(ev.data, arrival)
                elif isinstance(ev, Started) and tw is None:
                    stream.set_format(plain.audio_format)
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code in (1000, 1001):
            return None
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        return code, exc.rcvd.reason if exc.rcvd is not None else ""
    rcvd = ws.close_code
    if rcvd is not None and rcvd not in (1000, 1001):
        return rcvd, ws.close_reason or ""
    return None
