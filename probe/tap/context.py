"""Where a tapped hop learns its session, trace context, sink and audio format.

- :func:`from_start`: the ingress ``start`` the hop received, in the probe dialect
  (``{"type": "start", "session", "traceparent", "sink", "audio", ...}``, PROTOCOL.md 1.1) or as
  a Twilio Media Streams ``start`` event (``start.customParameters.session`` / ``.traceparent`` /
  ``.sink``, 8 kHz mu-law, PROTOCOL.md 3);
- :func:`from_headers`: a handshake's ``traceparent`` / ``tracestate`` headers and the URL's
  ``session``, ``traceparent`` and ``sink`` query parameters;
- :func:`from_otel`: the current OpenTelemetry span (and a ``probe.session`` baggage entry),
  when ``opentelemetry-api`` is installed; it is imported only when this is called.

Lenient on purpose, unlike the receivers of :mod:`probe.protocol`: a tap observes a stream it
does not own, so a value that is missing or not valid is left out (and named in ``notes``), never
raised. A ``traceparent`` read from an ingress ``start`` is the *caller's* span; the contract asks
a fork for the hop's own span context, so :meth:`ForkContext.hop_traceparent` makes a child span
context (same trace, new span id) unless the context came from the hop's own OTel span.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs

from probe.errors import ProtocolError
from probe.protocol import (
    AudioFormat,
    TraceContext,
    parse_audio_format,
    parse_traceparent,
    validate_tracestate,
)
from probe.protocol.messages import ProtocolViolation
from probe.tap.core import check_sink_url

__all__ = [
    "MULAW_8K",
    "ForkContext",
    "from_headers",
    "from_otel",
    "from_start",
    "twilio_media",
]

MULAW_8K = AudioFormat("mulaw", 8000, 1)
_SESSION_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


@dataclass(frozen=True, slots=True)
class ForkContext:
    """What a hop knows of the stream it taps; every field may be unknown (None).

    ``traceparent`` is the upstream caller's span context (from a start or headers) or, when
    ``own_span`` is true, the hop's own span (from OTel). ``stream_sid`` is set for Twilio."""

    session: str | None = None
    traceparent: TraceContext | None = None
    tracestate: str | None = None
    sink: str | None = None
    audio: AudioFormat | None = None
    stream_sid: str | None = None
    own_span: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    def hop_traceparent(self) -> TraceContext | None:
        """The span context to put in the fork's start: the hop's own span if known, else a new
        child of the caller's (same trace id and flags, a random span id)."""
        if self.traceparent is None or self.own_span:
            return self.traceparent
        span_id = secrets.token_hex(8)
        while span_id == "0" * 16:
            span_id = secrets.token_hex(8)
        return TraceContext(self.traceparent.trace_id, span_id, self.traceparent.flags)

    def merged(self, fallback: ForkContext) -> ForkContext:
        """This context with every unknown field taken from ``fallback``."""
        own = self.traceparent is not None
        return replace(
            self,
            session=self.session if self.session is not None else fallback.session,
            traceparent=self.traceparent if own else fallback.traceparent,
            tracestate=self.tracestate if own else fallback.tracestate,
            own_span=self.own_span if own else fallback.own_span,
            sink=self.sink if self.sink is not None else fallback.sink,
            audio=self.audio if self.audio is not None else fallback.audio,
            stream_sid=self.stream_sid if self.stream_sid is not None else fallback.stream_sid,
            notes=self.notes + fallback.notes,
        )


def _ignored(exc: Exception) -> str:
    return str(exc).rstrip(".") + " (ignored)"


def _session(value: object, where: str, notes: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and 1 <= len(value) <= 128 and set(value) <= _SESSION_CHARS:
        return value
    notes.append(f"{where} is not 1-128 characters of A-Z a-z 0-9 . _ : - (ignored)")
    return None


def _traceparent(value: object, where: str, notes: list[str]) -> TraceContext | None:
    if value is None:
        return None
    try:
        return parse_traceparent(value, key=where)
    except ProtocolError as exc:
        notes.append(_ignored(exc))
        return None


def _tracestate(value: object, where: str, notes: list[str]) -> str | None:
    if value is None:
        return None
    try:
        return validate_tracestate(value, key=where)
    except ProtocolError as exc:
        notes.append(_ignored(exc))
        return None


def _sink(value: object, where: str, notes: list[str]) -> str | None:
    if value is None:
        return None
    try:
        return check_sink_url(value, what=where)
    except ValueError as exc:
        notes.append(_ignored(exc))
        return None


def from_start(message: str | bytes | Mapping[str, object]) -> ForkContext | None:
    """The context in an ingress ``start`` (probe dialect or Twilio ``start`` event), or None
    when ``message`` is not a start message of either (including text that is not JSON)."""
    obj: object = message
    if isinstance(message, str | bytes | bytearray | memoryview):
        try:
            obj = json.loads(bytes(message) if not isinstance(message, str) else message)
        except (ValueError, RecursionError):
            return None
    if not isinstance(obj, Mapping):
        return None
    notes: list[str] = []
    if obj.get("type") == "start":
        audio = None
        raw_audio = obj.get("audio")
        if raw_audio is not None:
            try:
                audio = parse_audio_format(raw_audio)
            except ProtocolViolation as exc:
                notes.append(_ignored(exc))
        ctx = _traceparent(obj.get("traceparent"), "traceparent", notes)
        return ForkContext(
            session=_session(obj.get("session"), "session", notes),
            traceparent=ctx,
            tracestate=_tracestate(obj.get("tracestate"), "tracestate", notes) if ctx else None,
            sink=_sink(obj.get("sink"), "sink", notes),
            audio=audio,
            notes=tuple(notes),
        )
    if obj.get("event") == "start":
        start = obj.get("start")
        if not isinstance(start, Mapping):
            return None
        params = start.get("customParameters")
        if not isinstance(params, Mapping):
            params = {}
        sid = start.get("streamSid", obj.get("streamSid"))
        fmt = start.get("mediaFormat")
        audio = MULAW_8K
        if isinstance(fmt, Mapping) and (
            fmt.get("encoding", "audio/x-mulaw") != "audio/x-mulaw"
            or fmt.get("sampleRate", 8000) != 8000
        ):
            notes.append(
                f"start.mediaFormat {dict(fmt)!r} is not 8 kHz mu-law; "
                "its media is not forked"
            )
            audio = None
        p = "start.customParameters."
        ctx = _traceparent(params.get("traceparent"), p + "traceparent", notes)
        return ForkContext(
            session=_session(params.get("session"), p + "session", notes),
            traceparent=ctx,
            tracestate=_tracestate(params.get("tracestate"), p + "tracestate", notes)
            if ctx
            else None,
            sink=_sink(params.get("sink"), p + "sink", notes),
            audio=audio,
            stream_sid=sid if isinstance(sid, str) and sid else None,
            notes=tuple(notes),
        )
    return None


def twilio_media(message: str | bytes) -> tuple[str | None, bytes] | None:
    """``(track, payload)`` of a Twilio ``media`` event, or None for any other message (or one
    whose payload is not base64)."""
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("event") != "media":
        return None
    media = obj.get("media")
    if not isinstance(media, dict):
        return None
    payload = media.get("payload")
    if not isinstance(payload, str):
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        return None
    track = media.get("track")
    return (track if isinstance(track, str) else None), data


def from_headers(headers: Mapping[str, str], query: str = "") -> ForkContext:
    """The context of a WebSocket handshake: ``traceparent`` / ``tracestate`` headers (or query
    parameters of those names) and the ``session`` and ``sink`` query parameters."""
    notes: list[str] = []
    lower = {k.lower(): v for k, v in headers.items()}
    params = {k: v[0] for k, v in parse_qs(query.lstrip("?"), keep_blank_values=True).items()}
    raw_tp = lower.get("traceparent", params.get("traceparent"))
    ctx = _traceparent(raw_tp, "traceparent", notes)
    state = lower.get("tracestate", params.get("tracestate"))
    return ForkContext(
        session=_session(params.get("session"), "session", notes),
        traceparent=ctx,
        tracestate=_tracestate(state, "tracestate", notes) if ctx else None,
        sink=_sink(params.get("sink"), "sink", notes),
        notes=tuple(notes),
    )


def from_otel() -> ForkContext:
    """The current OpenTelemetry span as the hop's own span context (``own_span``), and the
    session from a ``probe.session`` baggage entry; an empty context without OTel or without a
    valid current span."""
    try:
        from opentelemetry import baggage, trace
    except ImportError:
        return ForkContext(notes=("opentelemetry-api is not installed",))
    notes: list[str] = []
    span_ctx = trace.get_current_span().get_span_context()
    ctx = None
    state = None
    if span_ctx.is_valid:
        ctx = TraceContext(
            f"{span_ctx.trace_id:032x}", f"{span_ctx.span_id:016x}", int(span_ctx.trace_flags)
        )
        header = span_ctx.trace_state.to_header() if span_ctx.trace_state else ""
        state = _tracestate(header, "tracestate", notes) if header else None
    session = baggage.get_baggage("probe.session")
    return ForkContext(
        session=_session(session, "baggage probe.session", notes) if session else None,
        traceparent=ctx,
        tracestate=state,
        own_span=ctx is not None,
        notes=tuple(notes),
    )
