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

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from probe.audio.formats import Encoding, decode, encode
from probe.measure.barge import BargeDone, BargeTracker
from probe.measure.conversation import Figure, ResultTiming
from probe.measure.latency import RETURN_HOP
from probe.measure.registry import SessionRegistry
from probe.measure.reply import ReplyTracker
from probe.measure.results import Malformed, ResultTracker, Utterance, parse_shape
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
from probe.protocol.twilio import Clear, Mark, TwilioReturnReceiver, TwilioSender
from probe.session.frames import SessionFrames, carrier, positions_in, shared_carrier
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
    # Barge-in (reply mode): start speaking again this many seconds into each reply.
    barge_in_s: float | None = None
    # Text results (a speech-to-text target): the preset shape of its JSON results and the
    # fields given over it (probe.measure.results.parse_shape). The stream is then the
    # fixture script's whole sentences, each followed by gap_s of silence.
    results: str | None = None
    result_fields: str | None = None
    # How long a session waits, after its last frame, for what it is still owed (finals).
    settle_s: float = 10.0

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
    carried (index, send time), the utterances that ended in it (end time), its first sample's
    send time ``at``, and the send times of a barge-in's first sample and of the end of its last
    frame, when a barge-in starts or ends in it."""

    n: int
    lag: float
    markers: tuple[tuple[int, float], ...] = ()
    utterance_ends: tuple[float, ...] = ()
    at: float = 0.0
    barge_start: float | None = None
    barge_end: float | None = None


# Seconds of speech the probe barges in with, and the least it makes a barge-in of (a shorter
# stretch of the gap is left silent: too short for a bot to hear as an interruption).
BARGE_S = 1.0
MIN_BARGE_S = 0.5


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
        turns = (cfg.utterance_s, cfg.gap_s) if cfg.reply and not cfg.results else None
        shared = shared_carrier(
            cfg.fixture, cfg.rate, cfg.duration_s, cfg.encoding, cfg.level_db, turns,
            cfg.gap_s if cfg.results else None,
        )
        positions = (
            positions_in(shared.spans, cfg.rate, cfg.every_s)
            if cfg.reply or cfg.results
            else marker_positions(len(shared.samples), cfg.rate, every_s=cfg.every_s)
        )
        self.utterances = [
            Utterance(a, b, shared.texts[i] if i < len(shared.texts) else None)
            for i, (a, b) in enumerate(shared.spans)
        ]
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
        # The run clock's time frame 0 was due (known from the first send).
        self._t0: float | None = None
        # Barge-in: the time the tap asked for one, and the frames it takes [n0, n1).
        self._barge_req: float | None = None
        self._barge: tuple[int, int] | None = None
        self._barge_pcm = b""
        # Twilio marks the system sent, answered when the audio before them has played.
        self._playout_end = -math.inf
        # (when it is answered, its name, when it arrived)
        self._marks: list[tuple[float, str, float]] = []

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
        pcm = self._barge_frame(n)
        if pcm is None:
            pcm = self.frames.frame(n)
        return self.twilio.media(pcm) if self.twilio is not None else pcm

    # -- barge-in ---------------------------------------------------------------------------

    def request_barge(self, at: float) -> None:
        """Start speaking again at ``at`` (run clock), if the stream is in a gap then. Safe to
        call from another thread than the one sending (it only sets one attribute)."""
        self._barge_req = at

    def _barge_frame(self, n: int) -> bytes | None:
        if self._barge_req is None and self._barge is None:
            return None
        if self._barge_req is not None and self._t0 is not None:
            at, self._barge_req = self._barge_req, None
            self._plan_barge(max(n, math.ceil((at - self._t0) / self.frame_s - 1e-9)))
        b = self._barge
        if b is None or not b[0] <= n < b[1]:
            return None
        step = self.frame_len * self.frames.shared.width
        at = (n - b[0]) * step
        return self._barge_pcm[at : at + step]

    def _plan_barge(self, n0: int) -> None:
        """Barge in from frame ``n0`` for BARGE_S, inside the silent gap it falls in."""
        shared = self.frames.shared
        a = n0 * self.frame_len
        nxt = len(shared.samples)
        for start, stop in shared.spans:
            if start <= a < stop + self.frame_len:
                return  # the probe is still speaking: no barge-in over its own utterance
            if start > a:
                nxt = start
                break
        n1 = min(n0 + int(round(BARGE_S / self.frame_s)), nxt // self.frame_len)
        if n1 - n0 < max(1, int(round(MIN_BARGE_S / self.frame_s))):
            return
        # Unmarked speech from the first utterance (or the start of the carrier), from its
        # first clearly audible sample: the barge-in is timed from its first sample sent, so
        # it must not open with the recording's lead-in.
        s0 = shared.spans[0][0] if shared.spans else 0
        clip = carrier(self.cfg.fixture, self.cfg.rate, self.cfg.duration_s)[0]
        loud = np.flatnonzero(np.abs(clip[s0:]) >= 0.01)
        s0 += int(loud[0]) if len(loud) else 0
        need = (n1 - n0) * self.frame_len
        speech = clip[s0 : s0 + need]
        if len(speech) < need:
            speech = np.concatenate([speech, np.zeros(need - len(speech), np.float32)])
        self._barge_pcm = encode(speech, self.cfg.encoding)
        self._barge = (n0, n1)

    # -- Twilio marks -----------------------------------------------------------------------

    def played(self, seconds: float, arrival: float) -> None:
        """Returned audio of ``seconds`` arrived: it plays after what is queued."""
        self._playout_end = max(self._playout_end, arrival) + seconds

    def mark(self, name: str, arrival: float) -> None:
        """The system sent a ``mark``: answer it once the audio before it has played."""
        self._marks.append((max(arrival, self._playout_end), name, arrival))

    def clear(self, arrival: float) -> None:
        """The system sent ``clear``: queued audio is dropped, pending marks answered now."""
        self._playout_end = arrival
        self._marks = [(arrival, name, got) for _, name, got in self._marks]

    def outgoing(self, now: float) -> list[str]:
        """Messages due to the system by ``now`` (Twilio: answers to its marks)."""
        return [m for m, _, _ in self.answers(now)]

    @property
    def owes(self) -> bool:
        """Whether any answer to the system is pending (cheap: checked before every frame)."""
        return bool(self._marks)

    def unanswered(self) -> list[float]:
        """The arrivals of the system's marks never answered (the stream ended first); they
        are forgotten."""
        out, self._marks = [got for _, _, got in self._marks], []
        return out

    def answers(self, now: float) -> list[tuple[str, float, float]]:
        """Answers due to the system's marks by ``now``: (message, the mark's arrival, when the
        audio before it had played)."""
        if not self._marks or self.twilio is None:
            return []
        due = [(t, name, got) for t, name, got in self._marks if t <= now]
        if not due:
            return []
        self._marks = [m for m in self._marks if m[0] > now]
        return [(self.twilio.mark(name), got, t) for t, name, got in due]

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
        if self._t0 is None:
            self._t0 = sent_at - lag - n * self.frame_s
        rate = self.cfg.rate
        marks = tuple((i, t_frame + off / rate) for i, off in self._markers.get(n, ()))
        ends = tuple(t_frame + off / rate for off in self._ends.get(n, ()))
        start = end = None
        if self._barge is not None:
            if self._barge[0] == n:
                start = t_frame
            if self._barge[1] - 1 == n:
                end = t_frame + self.frame_s
        return Sent(n, lag, marks, ends, t_frame, start, end)

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
    """The return direction of either dialect, as audio, format changes, Twilio marks and
    clears, and violations."""

    def __init__(self, audio: AudioFormat, twilio_sid: str | None) -> None:
        self._plain = ReturnReceiver(audio)
        self._twilio = TwilioReturnReceiver(twilio_sid) if twilio_sid is not None else None
        self.audio_format = audio

    def receive(self, frame: bytes | str) -> list[Audio | AudioFormat | Mark | Clear | Violation]:
        """One message back: its audio, a new audio format (probe dialect ``started``), a
        Twilio ``mark`` or ``clear``, or why it broke the protocol."""
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
        out: list[Audio | AudioFormat | Mark | Clear | Violation] = []
        for ev in events:
            if isinstance(ev, (Audio, Mark, Clear)):
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
    one :class:`ReplyTracker`, each answer (or its absence) into the registry; with barge-in,
    each reply's onset asks ``core`` to barge in ``barge_in_s`` later and a
    :class:`~probe.measure.barge.BargeTracker` times how the bot stops. Not thread-safe: the
    shells call it from one thread (the detection worker, or the greenlets' hub)."""

    def __init__(
        self,
        registry: SessionRegistry,
        session: str,
        threshold_dbfs: float,
        *,
        core: SessionCore | None = None,
        barge_in_s: float | None = None,
    ) -> None:
        self.tracker = ReplyTracker(
            threshold_dbfs=threshold_dbfs, max_wait_s=registry.marker_timeout
        )
        self.registry = registry
        self.session = session
        self.core = core
        self.barge_in_s = barge_in_s
        self.barge = (
            BargeTracker(
                session,
                threshold_dbfs=threshold_dbfs,
                timeout_s=registry.marker_timeout,
                expect_clear=core is not None and core.twilio is not None,
            )
            if barge_in_s is not None
            else None
        )
        self._barges: set[float] = set()

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
            # One barge-in per reply to the probe's own utterances, none into the answer to a
            # barge-in (that would chain barge-ins through the gap).
            if self.barge_in_s is not None and self.core is not None and end not in self._barges:
                self.core.request_barge(end + latency + self.barge_in_s)
        if self.barge is not None:
            self._tell(self.barge.feed(samples, fmt.sample_rate, arrival))

    def barged(self, t0: float) -> None:
        """The probe's barge-in speech began going out at ``t0``."""
        if self.barge is not None:
            self._tell(self.barge.barge(t0))

    def barge_ended(self, t1: float) -> None:
        """The probe's barge-in speech was all sent by ``t1``."""
        if self.barge is not None:
            self._tell(self.barge.ended(t1))
        # The barge-in is an utterance too: the bot's answer to it is a reply.
        self._barges.add(t1)
        self.tracker.utterance_end(self.session, t1)

    def clear(self, arrival: float) -> None:
        if self.barge is not None:
            self._tell(self.barge.clear(arrival))

    def tick(self, now: float) -> None:
        if self.barge is not None and self.barge.active:
            self._tell(self.barge.tick(now))

    def _tell(self, events: list[Figure | BargeDone]) -> None:
        for ev in events:
            if isinstance(ev, Figure):
                self.registry.record_figure(ev)
            else:
                self.registry.record_barge_in(ev.session, talked_over=ev.talked_over)

    def close(self, now: float | None = None) -> None:
        if self.barge is not None:
            if now is not None:
                self._tell(self.barge.tick(now))
            self._tell(self.barge.close())
        self.tracker.close(self.session)
        for m in self.tracker.expire(float("inf")):
            self.registry.record_reply(self.session, m.utterance_end, None)


class SessionRecorder:
    """What a session's sends and messages back mean, applied to the registry, the return
    direction's detection stream, in reply mode the reply tap (run through ``run``), and with
    text results the session's :class:`~probe.measure.results.ResultTracker` (inline: parsing a
    result is cheap)."""

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
            ReplyTap(
                registry, core.session, cfg.reply_threshold_dbfs,
                core=core, barge_in_s=cfg.barge_in_s,
            )
            if cfg.reply
            else None
        )
        self.results = (
            ResultTracker(
                core.session,
                shape=parse_shape(cfg.results, cfg.result_fields),
                rate=cfg.rate,
                frame_len=core.frame_len,
                utterances=core.utterances,
                timeout_s=registry.marker_timeout,
            )
            if cfg.results
            else None
        )
        self._heard = False
        self._barging = False
        self.frames_sent = 0

    def sent(self, n: int, sent_at: float, lag: float, *, from_intended: bool = False) -> Sent:
        s = self.core.sent(n, sent_at, lag, from_intended=from_intended)
        self.frames_sent += 1
        session = self.core.session
        self.registry.record_send_lag(session, s.lag)
        for index, t in s.markers:
            self.registry.record_send(session, index, t)
        if self.results is not None:
            self.results.frame_sent(n, s.at)
        if self.tap is not None:
            for t in s.utterance_ends:
                self._run(self.tap.utterance_end, t)
            if s.barge_start is not None:
                self._barging = True
                self._run(self.tap.barged, s.barge_start)
            if s.barge_end is not None:
                self._run(self.tap.barge_ended, s.barge_end)
            if self._barging:
                self._run(self.tap.tick, sent_at)
        return s

    def outgoing(self, now: float) -> list[str]:
        """Messages owed to the system by ``now`` (answers to Twilio marks); each answered mark
        is a timing point: from its arrival to the moment the audio before it had played."""
        out = []
        for message, got, played in self.core.answers(now):
            out.append(message)
            self.registry.record_figure(Figure(self.core.session, "mark", got, played - got))
        return out

    def settled(self) -> bool:
        """Nothing more is owed by the system (every utterance sent whole has its final)."""
        return self.results is None or self.results.settled()

    def received(self, frame: bytes | str, arrival: float) -> None:
        session = self.core.session
        if self.results is not None and not isinstance(frame, bytes):
            found = self.results.receive(frame, arrival)
            for r in found:
                if isinstance(r, ResultTiming):
                    self.registry.record_result(r)
                elif isinstance(r, Figure):
                    self.registry.record_figure(r)
                else:
                    self.registry.record_malformed_result(session, r.reason)
            if any(isinstance(r, (ResultTiming, Malformed)) for r in found):
                return
        for ev in self.core.returns.receive(frame):
            if isinstance(ev, Violation):
                self.registry.hop_error(RETURN_HOP, session, ev.reason)
            elif isinstance(ev, AudioFormat):
                self.stream.set_format(ev)
            elif isinstance(ev, Mark):
                self.core.mark(ev.name, arrival)
                self.registry.record_bot_mark(session)
            elif isinstance(ev, Clear):
                self.core.clear(arrival)
                if self.tap is not None:
                    self._run(self.tap.clear, arrival)
            else:
                fmt = self.core.returns.audio_format
                self.core.played(len(ev.data) / fmt.frame_width / fmt.sample_rate, arrival)
                if self.tap is None:
                    if not self._heard:
                        # Audio comes back, so the return direction owes every marker.
                        self._heard = True
                        self.registry.hop_connected(RETURN_HOP, session)
                else:
                    # A reply in the system's own voice: timed by the tap, not as a hop.
                    self._run(self.tap.feed, fmt, ev.data, arrival)
                self.stream.feed(ev.data, arrival)

    def close(self, now: float | None = None, *, cut: bool = False) -> None:
        """The stream is over (at ``now``, the run clock, when known): the detection stream
        ends, pending replies, barge-ins and results settle. ``cut``: the probe itself ended
        the stream early (a load test stopping), so finals still pending are not owed."""
        self.stream.close()
        if self.tap is not None:
            self._run(self.tap.close, now)
        for got in self.core.unanswered():
            why = "the stream ended before its audio played"
            self.registry.record_figure(Figure(self.core.session, "mark", got, None, why=why))
        if self.results is not None:
            figures, words = self.results.close(cut=cut)
            for f in figures:
                self.registry.record_figure(f)
            if words is not None:
                self.registry.record_word_errors(words)
