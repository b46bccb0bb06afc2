"""The source: one probe session streamed to the system under test in real time.

A thin asyncio shell over the protocol builders, the embedder and the registry:

- the session's speech is marked once, up front (payloads name the session and marker number);
- frame n is due at t0 + n * frame length on an absolute schedule; the loop sleeps until the due
  time and sends, never sleeping a fixed period after a send, so lateness never accumulates;
- the wall-clock time a frame is handed to the socket is its send time; a marker's send time is
  its frame's plus its offset in the frame over the rate (PROTOCOL.md section 4), and each
  frame's lag (actual minus due) is recorded;
- audio coming back on the same connection is the hop ``return``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from probe.audio.fixtures import load_fixture
from probe.audio.formats import Encoding, decode, encode
from probe.hopstream import DetectionWorker, HopStream
from probe.measure.expect import ExpectationBook
from probe.measure.registry import SessionRegistry
from probe.measure.reply import ReplyTracker
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
from probe.watermark.design import DEFAULT_EVERY_S, DEFAULT_LEVEL_DB, MARKER_S
from probe.watermark.embed import active_rms, embed
from probe.wsstamp import StampedClientConnection, client_factory

RETURN_HOP = "return"


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """How each session streams."""

    target: str
    dialect: str = "probe"
    fixture: str = "speech_en_us"
    rate: int = 16000
    encoding: Encoding = "pcm_s16le"
    frame_ms: float = 20.0
    duration_s: float = 5.0
    every_s: float = DEFAULT_EVERY_S
    level_db: float = DEFAULT_LEVEL_DB
    sink_url: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 5.0
    drain_s: float = 3.0
    # Reply mode: the system answers in its own voice instead of passing the audio on. The
    # stream alternates utterances of speech with silent gaps; the return direction is timed as
    # voice-to-voice reply latency (end of utterance to reply onset), not as the `return` hop.
    reply: bool = False
    utterance_s: float = 3.0
    gap_s: float = 3.0
    reply_threshold_dbfs: float = -40.0

    def __post_init__(self) -> None:
        if self.dialect == "twilio" and (self.rate != 8000 or self.encoding != "mulaw"):
            object.__setattr__(self, "rate", 8000)
            object.__setattr__(self, "encoding", "mulaw")


def new_trace_context() -> TraceContext:
    """A fresh root context for a session (sampled)."""
    return TraceContext(secrets.token_hex(16), secrets.token_hex(8), 1)


@lru_cache(maxsize=16)
def _carrier(fixture: str, rate: int, duration_s: float) -> tuple[np.ndarray, float]:
    x, _ = load_fixture(fixture, rate=rate)
    n = int(round(duration_s * rate))
    reps = int(np.ceil(n / max(1, len(x))))
    looped = np.tile(x, reps)[:n].astype(np.float32)
    looped.setflags(write=False)
    return looped, active_rms(np.asarray(x, dtype=np.float32), rate)


def turn_layout(
    carrier: np.ndarray, rate: int, utterance_s: float, gap_s: float
) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    """Speech cut into utterances of ``utterance_s`` with ``gap_s`` of silence after each.

    Returns the audio, the sample index just after each utterance (its end), and the
    ``(start, stop)`` sample ranges that hold speech."""
    u = max(1, int(round(utterance_s * rate)))
    g = max(0, int(round(gap_s * rate)))
    out = np.zeros(len(carrier), dtype=np.float32)
    ends: list[int] = []
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(carrier):
        stop = min(len(carrier), start + u)
        out[start:stop] = carrier[start:stop]
        ends.append(stop)
        spans.append((start, stop))
        start = stop + g
    return out, ends, spans


def _positions_in(spans: list[tuple[int, int]], rate: int, every_s: float) -> list[int]:
    """Marker starts every ``every_s`` inside each speech span, wholly inside it."""
    length = int(round(MARKER_S * rate))
    out: list[int] = []
    for start, stop in spans:
        t = start + int(round(0.25 * rate))
        while t + length <= stop:
            out.append(t)
            t += max(length, int(round(every_s * rate)))
    return out


class DetectStream(Protocol):
    """Where the return direction's audio goes for marker detection (never blocks the loop)."""

    def feed(self, data: bytes, arrival: float) -> None: ...
    def set_format(self, audio: AudioFormat) -> None: ...
    def close(self) -> None: ...


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


class _ReplyTap:
    """Voice-to-voice timing of one session: utterance ends from the pacing loop, reply audio
    from the detection thread, both into one :class:`ReplyTracker` under a lock."""

    def __init__(self, cfg: SourceConfig, registry: SessionRegistry, session: str) -> None:
        self.tracker = ReplyTracker(
            threshold_dbfs=cfg.reply_threshold_dbfs, max_wait_s=registry.marker_timeout
        )
        self.registry = registry
        self.session = session
        self._lock = threading.Lock()

    def utterance_end(self, t: float) -> None:
        with self._lock:
            self.tracker.utterance_end(self.session, t)

    def feed(self, fmt: AudioFormat, data: bytes, arrival: float) -> None:
        usable = len(data) - len(data) % fmt.frame_width
        if usable <= 0:
            return
        samples = decode(data[:usable], fmt.encoding)
        with self._lock:
            seen = len(self.tracker.answers)
            self.tracker.feed(self.session, samples, fmt.sample_rate, arrival)
            new = self.tracker.answers[seen:]
        for end, latency in new:
            self.registry.record_reply(self.session, end, latency)

    def close(self) -> None:
        with self._lock:
            self.tracker.close(self.session)
            missed = self.tracker.expire(float("inf"))
        for m in missed:
            self.registry.record_reply(self.session, m.utterance_end, None)


def target_url(template: str, session: str) -> str:
    """The target URL with ``{session}`` replaced by the session id."""
    return template.replace("{session}", session)


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

    The return direction's detection runs where ``open_stream`` puts it (the sink's child
    process in a run, see :mod:`probe.sinkproc`), by default on ``worker``, informed by ``book``
    (fed with this session's marker sends on ``worker``'s thread) when given."""
    result = SessionResult(session)
    registry.open_session(session)
    carrier, ref_rms = _carrier(cfg.fixture, cfg.rate, cfg.duration_s)
    positions: list[int] | None = None
    ends: list[int] = []
    if cfg.reply:
        carrier, ends, spans = turn_layout(carrier, cfg.rate, cfg.utterance_s, cfg.gap_s)
        positions = _positions_in(spans, cfg.rate, cfg.every_s)
    marked, placements = embed(
        carrier,
        cfg.rate,
        lambda i: registry.payload_for(session, i),
        every_s=cfg.every_s,
        level_db=cfg.level_db,
        reference_rms=ref_rms,
        positions=positions,
    )
    frame_len = max(1, int(round(cfg.frame_ms * cfg.rate / 1000)))
    # Encoded once up front: the pacing loop then only hands bytes to the socket.
    encoded = encode(marked, cfg.encoding)
    width = len(encoded) // max(1, len(marked))
    step = frame_len * width
    frames = [encoded[i : i + step] for i in range(0, len(encoded), step)]
    marker_at: dict[int, list[tuple[int, int]]] = {}
    for p in placements:
        marker_at.setdefault(p.sample // frame_len, []).append((p.index, p.sample % frame_len))
    # An utterance ends after its last speech sample: (frame of that sample, offset of the end).
    end_at: dict[int, list[int]] = {}
    for e in ends:
        k = (e - 1) // frame_len
        end_at.setdefault(k, []).append(e - k * frame_len)
    tap = _ReplyTap(cfg, registry, session) if cfg.reply else None
    audio = AudioFormat(cfg.encoding, cfg.rate, 1)
    url = target_url(cfg.target, session)
    ctx: TraceContext | None = None
    if registry.observer is not None:
        ctx = registry.observer.session_started(session, url, clock())
    if ctx is None:
        ctx = new_trace_context()
    try:
        async with asyncio.timeout(cfg.connect_timeout_s):
            ws = await connect(
                url,
                max_size=2**22,
                open_timeout=cfg.connect_timeout_s,
                create_connection=client_factory(clock),
            )
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        why = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else str(exc)
        result.error = f"cannot connect to {url}: {why or type(exc).__name__}"
        registry.session_failed(session, result.error)
        return result
    stream: DetectStream = (
        open_stream(RETURN_HOP, audio, session)
        if open_stream is not None
        else LocalStream(registry, worker, RETURN_HOP, audio, session, book)
    )
    twilio: TwilioSender | None = None
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
            await ws.send(twilio.connected())
            await ws.send(twilio.start())
        else:
            start = IngressStart(
                session=session, traceparent=ctx, audio=audio, sink=cfg.sink_url, meta=cfg.meta
            )
            await ws.send(to_json(start))
        receiving = asyncio.create_task(
            _receive(
                ws, stream, registry, session, worker, audio, clock,
                twilio.stream_sid if twilio else None, tap,
            )
        )
        frame_s = frame_len / cfg.rate
        loop = asyncio.get_running_loop()
        base = loop.time()
        for n, payload in enumerate(frames):
            due = base + n * frame_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiving.done():
                break
            lag = loop.time() - due
            sent_at = clock()
            if twilio is not None:
                await ws.send(twilio.media(payload))
            else:
                await ws.send(payload)
            result.frames_sent += 1
            registry.record_send_lag(session, max(0.0, lag))
            for index, offset in marker_at.get(n, ()):
                registry.record_send(session, index, sent_at + offset / cfg.rate)
            if tap is not None:
                for offset in end_at.get(n, ()):
                    tap.utterance_end(sent_at + offset / cfg.rate)
        if not receiving.done():
            await ws.send(twilio.stop() if twilio is not None else to_json(Stop()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(receiving), timeout=cfg.drain_s)
        if receiving.done() and receiving.exception() is None:
            closed = receiving.result()
            if closed is not None:
                result.error = _closed_message(*closed, result.frames_sent, frame_len, cfg.rate)
        receiving.cancel()
        await ws.close(1000)
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        result.error = _closed_message(code, reason, result.frames_sent, frame_len, cfg.rate)
    finally:
        stream.close()
        if tap is not None:
            worker.submit(tap.close)
        await ws.close()
    if result.error is None and result.frames_sent < len(frames):
        result.error = f"stream ended after {result.frames_sent} of {len(frames)} frames"
    registry.close_session(session, error=result.error)
    return result


def _closed_message(code: int, reason: str, frames: int, frame_len: int, rate: int) -> str:
    when = frames * frame_len / rate
    if frames == 0 and code in (1003, 1008):
        return f"target refused the stream: close {code} {reason}".strip()
    return f"target closed the connection after {when:.2f} s: close {code} {reason}".strip()


async def _receive(
    ws: ClientConnection,
    stream: DetectStream,
    registry: SessionRegistry,
    session: str,
    worker: DetectionWorker,
    audio: AudioFormat,
    clock: Callable[[], float],
    twilio_sid: str | None,
    tap: _ReplyTap | None = None,
) -> tuple[int, str] | None:
    """Read the return direction until the target closes; return its abnormal close code."""
    plain = ReturnReceiver(audio)
    tw = TwilioReturnReceiver(twilio_sid) if twilio_sid is not None else None
    heard = False
    fmt = audio
    try:
        async for frame in ws:
            arrival = ws.arrival() if isinstance(ws, StampedClientConnection) else clock()
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
                    if not heard and tap is None:
                        # Audio comes back, so the return direction owes every marker (unless
                        # it is a reply in the system's own voice, timed by the tap instead).
                        heard = True
                        registry.hop_connected(RETURN_HOP, session)
                    stream.feed(ev.data, arrival)
                    if tap is not None:
                        worker.submit(tap.feed, fmt, ev.data, arrival)
                elif isinstance(ev, Started) and tw is None:
                    fmt = plain.audio_format
                    stream.set_format(fmt)
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code in (1000, 1001):
            return None
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        return code, exc.rcvd.reason if exc.rcvd is not None else ""
    rcvd = ws.close_code
    if rcvd is not None and rcvd not in (1000, 1001):
        return rcvd, ws.close_reason or ""
    return None

