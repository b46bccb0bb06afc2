"""One probe session, sans-I/O: what to send when, and what each send and each message back means.

Both shells (asyncio in :mod:`probe.aio.source`, gevent in :mod:`probe.locust.session`) drive the
same :class:`SessionCore` and :class:`SessionRecorder`; they only connect, sleep, send, receive
and stamp. The core holds:

- the session's frames: the shared carrier (cut into utterances and gaps in reply mode) with this
  session's markers (:class:`~probe.session.frames.SessionFrames`);
- the schedule: frame n is due at t0 + n * frame length (absolute, so lateness never
  accumulates); a marker's send time is its frame's send time plus its offset in the frame over
  the rate, or, with ``from_intended`` (the open model), the frame's *due* time plus that offset,
  so a late probe adds its lateness to the latency instead of hiding it (PROTOCOL.md section 4);
- the wire messages of both dialects (the probe protocol and Twilio Media Streams);
- the return direction behind one receiver (:class:`ReturnSide`) for both dialects;
- the wording of every way a session ends.

:class:`SessionRecorder` applies what a send and a message back mean to the registry, the return
direction's detection stream and the reply-mode tap. It keeps no locks and starts no threads:
``run`` decides where CPU work on returned audio happens (a worker thread, or inline).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from probe.audio.formats import Encoding, decode
from probe.measure.latency import RETURN_HOP
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
from probe.session.frames import SessionFrames, positions_in, shared_carrier
from probe.watermark.design import DEFAULT_EVERY_S, DEFAULT_LEVEL_DB
from probe.watermark.embed import marker_positions

__all__ = [
    "RETURN_HOP",
    "DetectStream",
    "ReplyTap",
    "ReturnSide",
    "Sent",
    "SessionCore",
    "SessionRecorder",
    "SourceConfig",
    "new_trace_context",
    "open_session",
    "target_url",
]


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
    # CA bundle a wss:// target is checked against (None: the system's trust store).
    ca_file: str | None = None
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


def target_url(template: str, session: str) -> str:
    """The target URL with ``{session}`` replaced by the session id."""
    return template.replace("{session}", session)


@dataclass(frozen=True, slots=True)
class Sent:
    """What handing frame ``n`` to the socket means: its lag (actual minus due), the markers it
    carried (index, send time) and the utterances that ended in it (end time)."""

    n: int
    lag: float
    markers: tuple[tuple[int, float], ...] = ()
    utterance_ends: tuple[float, ...] = ()


class SessionCore:
    """One session's frames, schedule, messages and close wording (module docstring)."""

    def __init__(
        self,
        cfg: SourceConfig,
        session: str,
        trace: TraceContext,
        payload_for: Callable[[int], bytes],
        *,
        twilio_ids: tuple[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.trace = trace
        self.url = target_url(cfg.target, session)
        self.audio = AudioFormat(cfg.encoding, cfg.rate, 1)
        turns = (cfg.utterance_s, cfg.gap_s) if cfg.reply else None
        shared = shared_carrier(
            cfg.fixture, cfg.rate, cfg.duration_s, cfg.encoding, cfg.level_db, turns
        )
        positions = (
            positions_in(shared.spans, cfg.rate, cfg.every_s)
            if cfg.reply
            else marker_positions(len(shared.samples), cfg.rate, every_s=cfg.every_s)
        )
        payloads = [payload_for(i) for i in range(len(positions))]
        self.frame_len = max(1, int(round(cfg.frame_ms * cfg.rate / 1000)))
        self.frame_s = self.frame_len / cfg.rate
        self.frames = SessionFrames(shared, self.frame_len, positions, payloads)
        self.n_frames = self.frames.n_frames
        self._markers: dict[int, list[tuple[int, int]]] = {}
        for p in self.frames.placements:
            k = p.sample // self.frame_len
            self._markers.setdefault(k, []).append((p.index, p.sample % self.frame_len))
        # An utterance ends after its last speech sample: (frame of that sample, offset of end).
        self._ends: dict[int, list[int]] = {}
        for e in shared.ends:
            k = (e - 1) // self.frame_len
            self._ends.setdefault(k, []).append(e - k * self.frame_len)
        self.twilio: TwilioSender | None = None
        if cfg.dialect == "twilio":
            stream_sid, call_sid = twilio_ids or (
                "MZ" + secrets.token_hex(16),
                "CA" + secrets.token_hex(16),
            )
            self.twilio = TwilioSender(
                stream_sid, call_sid, session, trace, sink=cfg.sink_url, meta=cfg.meta or None
            )
        self.returns = ReturnSide(self.audio, self.twilio.stream_sid if self.twilio else None)

    # -- what to send -----------------------------------------------------------------------

    def opening(self) -> list[str]:
        """The messages that open the stream, in order."""
        if self.twilio is not None:
            return [self.twilio.connected(), self.twilio.start()]
        start = IngressStart(
            session=self.session,
            traceparent=self.trace,
            audio=self.audio,
            sink=self.cfg.sink_url,
            meta=self.cfg.meta,
        )
        return [to_json(start)]

    def message(self, n: int) -> bytes | str:
        """The message carrying frame ``n`` (``n`` increasing)."""
        pcm = self.frames.frame(n)
        return self.twilio.media(pcm) if self.twilio is not None else pcm

    def prepare(self, n: int) -> None:
        """Make frame ``n``'s marked audio ahead of its due time (call right after a send)."""
        self.frames.prepare(n)

    def due(self, base: float, n: int) -> float:
        """When frame ``n`` is due, on the clock ``base`` (frame 0's due time) is on."""
        return base + n * self.frame_s

    def sent(self, n: int, sent_at: float, lag: float, *, from_intended: bool = False) -> Sent:
        """Frame ``n`` was handed to the socket at ``sent_at`` (run clock), ``lag`` late."""
        lag = max(0.0, lag)
        t_frame = sent_at - lag if from_intended else sent_at
        rate = self.cfg.rate
        marks = tuple((i, t_frame + off / rate) for i, off in self._markers.get(n, ()))
        ends = tuple(t_frame + off / rate for off in self._ends.get(n, ()))
        return Sent(n, lag, marks, ends)

    def closing(self) -> str:
        """The message that ends the stream."""
        return self.twilio.stop() if self.twilio is not None else to_json(Stop())

    # -- how it ended -----------------------------------------------------------------------

    def connect_failed(self, why: str) -> str:
        return f"cannot connect to {self.url}: {why}"

    def closed(self, code: int, reason: str, frames_sent: int) -> str:
        """The target closed abnormally with ``code`` after ``frames_sent`` frames."""
        when = frames_sent * self.frame_s
        if frames_sent == 0 and code in (1003, 1008):
            return f"target refused the stream: close {code} {reason}".strip()
        return f"target closed the connection after {when:.2f} s: close {code} {reason}".strip()

    def broken(self, frames_sent: int, why: str) -> str:
        return f"the connection to {self.url} failed after {frames_sent} frames: {why}"

    @staticmethod
    def abnormal(code: int | None, reason: str | None) -> tuple[int, str] | None:
        """A close worth reporting: (code, reason) unless it is normal (1000, 1001) or none."""
        if code is None or code in (1000, 1001):
            return None
        return code, reason or ""

    def incomplete(self, frames_sent: int) -> str | None:
        if frames_sent < self.n_frames:
            return f"stream ended after {frames_sent} of {self.n_frames} frames"
        return None


def open_session(
    cfg: SourceConfig, session: str, registry: SessionRegistry, clock: Callable[[], float]
) -> SessionCore:
    """Register a new session (the observers may give its trace context) and make its core."""
    registry.open_session(session)
    ctx: TraceContext | None = None
    if registry.observer is not None:
        ctx = registry.observer.session_started(session, target_url(cfg.target, session), clock())
    return SessionCore(
        cfg, session, ctx or new_trace_context(), lambda i: registry.payload_for(session, i)
    )


@dataclass(frozen=True, slots=True)
class Violation:
    """A message back that breaks the protocol (the stream goes on)."""

    reason: str


class ReturnSide:
    """The return direction of either dialect, as audio, format changes and violations."""

    def __init__(self, audio: AudioFormat, twilio_sid: str | None) -> None:
        self._plain = ReturnReceiver(audio)
        self._twilio = TwilioReturnReceiver(twilio_sid) if twilio_sid is not None else None
        self.audio_format = audio

    def receive(self, frame: bytes | str) -> list[Audio | AudioFormat | Violation]:
        """One message back: its audio, a new audio format (probe dialect ``started``), or
        why it broke the protocol."""
        try:
            if self._twilio is not None:
                events: list[object] = list(
                    self._twilio.receive_binary(frame)
                    if isinstance(frame, bytes)
                    else self._twilio.receive_text(frame)
                )
            else:
                events = list(
                    self._plain.receive_binary(frame)
                    if isinstance(frame, bytes)
                    else self._plain.receive_text(frame)
                )
        except ProtocolViolation as exc:
            return [Violation(exc.reason)]
        out: list[Audio | AudioFormat | Violation] = []
        for ev in events:
            if isinstance(ev, Audio):
                out.append(ev)
            elif isinstance(ev, Started) and self._twilio is None:
                self.audio_format = self._plain.audio_format
                out.append(self.audio_format)
        return out


class DetectStream(Protocol):
    """Where the return direction's audio goes for marker detection (never blocks the caller)."""

    def feed(self, data: bytes, arrival: float) -> None: ...
    def set_format(self, audio: AudioFormat) -> None: ...
    def close(self) -> None: ...


class ReplyTap:
    """Voice-to-voice timing of one session (reply mode): utterance ends and reply audio into
    one :class:`ReplyTracker`, each answer (or its absence) into the registry. Not thread-safe:
    the shells call it from one thread (the detection worker, or the greenlets' hub)."""

    def __init__(self, registry: SessionRegistry, session: str, threshold_dbfs: float) -> None:
        self.tracker = ReplyTracker(
            threshold_dbfs=threshold_dbfs, max_wait_s=registry.marker_timeout
        )
        self.registry = registry
        self.session = session

    def utterance_end(self, t: float) -> None:
        self.tracker.utterance_end(self.session, t)

    def feed(self, fmt: AudioFormat, data: bytes, arrival: float) -> None:
        usable = len(data) - len(data) % fmt.frame_width
        if usable <= 0:
            return
        samples = decode(data[:usable], fmt.encoding)
        seen = len(self.tracker.answers)
        self.tracker.feed(self.session, samples, fmt.sample_rate, arrival)
        for end, latency in self.tracker.answers[seen:]:
            self.registry.record_reply(self.session, end, latency)

    def close(self) -> None:
        self.tracker.close(self.session)
        for m in self.tracker.expire(float("inf")):
            self.registry.record_reply(self.session, m.utterance_end, None)


class SessionRecorder:
    """What a session's sends and messages back mean, applied to the registry, the return
    direction's detection stream and, in reply mode, the reply tap (run through ``run``)."""

    def __init__(
        self,
        core: SessionCore,
        registry: SessionRegistry,
        stream: DetectStream,
        run: Callable[..., object],
    ) -> None:
        self.core = core
        self.registry = registry
        self.stream = stream
        self._run = run
        cfg = core.cfg
        self.tap = (
            ReplyTap(registry, core.session, cfg.reply_threshold_dbfs) if cfg.reply else None
        )
        self._heard = False
        self.frames_sent = 0

    def sent(self, n: int, sent_at: float, lag: float, *, from_intended: bool = False) -> Sent:
        s = self.core.sent(n, sent_at, lag, from_intended=from_intended)
        self.frames_sent += 1
        session = self.core.session
        self.registry.record_send_lag(session, s.lag)
        for index, t in s.markers:
            self.registry.record_send(session, index, t)
        if self.tap is not None:
            for t in s.utterance_ends:
                self._run(self.tap.utterance_end, t)
        return s

    def received(self, frame: bytes | str, arrival: float) -> None:
        session = self.core.session
        for ev in self.core.returns.receive(frame):
            if isinstance(ev, Violation):
                self.registry.hop_error(RETURN_HOP, session, ev.reason)
            elif isinstance(ev, AudioFormat):
                self.stream.set_format(ev)
            else:
                if self.tap is None:
                    if not self._heard:
                        # Audio comes back, so the return direction owes every marker.
                        self._heard = True
                        self.registry.hop_connected(RETURN_HOP, session)
                else:
                    # A reply in the system's own voice: timed by the tap, not as a hop.
                    self._run(self.tap.feed, self.core.returns.audio_format, ev.data, arrival)
                self.stream.feed(ev.data, arrival)

    def close(self) -> None:
        """The stream is over: the detection stream ends and pending replies settle."""
        self.stream.close()
        if self.tap is not None:
            self._run(self.tap.close)
