"""The Twilio Media Streams dialect (PROTOCOL.md section 3), sans-I/O.

In this dialect the probe plays Twilio: it sends `connected`, `start`, `media`, `mark` and `stop`
events shaped as Twilio documents them, with the session and trace context in
`start.customParameters`. The system answers with `media`, `mark` and `clear` events for the same
`streamSid`. Payloads are raw 8 kHz mu-law bytes, base64 in the JSON; no audio is converted here.

- `TwilioSender`: the probe's outbound events, with Twilio's counters.
- `TwilioReceiver`: a system's view of those events (used by the reference pipeline).
- `TwilioResponder`: the system's outbound `media` / `mark` / `clear` events.
- `TwilioReturnReceiver`: the probe's view of what the system sends back.

Twilio's wire facts kept here: `sequenceNumber`, `media.chunk` and `media.timestamp` are decimal
strings; `sequenceNumber` is 1 on `start` and counts every later event; `connected` has none;
`chunk` counts media events from 1; `timestamp` is milliseconds of audio since the stream began.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeAlias

from probe.errors import ProtocolError
from probe.protocol._util import show
from probe.protocol.messages import (
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    AudioFormat,
    IngressStart,
    ProtocolViolation,
    decode_object,
)
from probe.protocol.streams import Audio, Started, Stopped
from probe.protocol.trace import TraceContext, parse_traceparent, validate_tracestate

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "TWILIO_AUDIO",
    "TWILIO_ENCODING",
    "Clear",
    "Mark",
    "TwilioEvent",
    "TwilioReceiver",
    "TwilioResponder",
    "TwilioReturnEvent",
    "TwilioReturnReceiver",
    "TwilioSender",
]

TWILIO_ENCODING = "audio/x-mulaw"
TWILIO_SAMPLE_RATE = 8000
TWILIO_AUDIO = AudioFormat("mulaw", TWILIO_SAMPLE_RATE, 1)
DEFAULT_ACCOUNT_SID = "AC" + "0" * 32
_PROTOCOL = "Call"
_VERSION = "1.0.0"
_TRACK = "inbound"
# customParameters keys that become IngressStart fields; every other one becomes meta.
_RESERVED_PARAMETERS = ("session", "traceparent", "tracestate", "sink")


@dataclass(frozen=True, slots=True)
class Mark:
    """A `mark` event: a named point in the audio stream."""

    name: str


@dataclass(frozen=True, slots=True)
class Clear:
    """A `clear` event: the system asks to drop audio it sent that has not been played yet."""


TwilioEvent: TypeAlias = Started[IngressStart] | Audio | Mark | Stopped
TwilioReturnEvent: TypeAlias = Audio | Mark | Clear


def _dumps(obj: Mapping[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def _b64(payload: bytes) -> str:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    return base64.b64encode(bytes(payload)).decode("ascii")


def _sid(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolViolation(f"{key} must be a non-empty string, got {show(value)}.")
    return value


def _object(value: object, key: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ProtocolViolation(f"{key} must be an object, got {show(value)}.")
    return value


def _get(obj: Mapping[str, object], key: str, path: str) -> object:
    value = obj.get(key)
    if value is None:
        raise ProtocolViolation(f"Twilio event is missing the required key '{path}'.")
    return value


def _event(obj: Mapping[str, object]) -> str:
    kind = obj.get("event")
    if kind is None:
        raise ProtocolViolation("Twilio message has no 'event' key; every message needs one.")
    if not isinstance(kind, str):
        raise ProtocolViolation(f"Twilio message key 'event' must be a string, got {show(kind)}.")
    return kind


def _payload(media: Mapping[str, object]) -> bytes:
    value = _get(media, "payload", "media.payload")
    if not isinstance(value, str):
        raise ProtocolViolation(f"media.payload must be a base64 string, got {show(value)}.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolViolation(
            f"media.payload is not valid base64 ({len(value)} characters)."
        ) from None


def _mark_name(obj: Mapping[str, object]) -> str:
    mark = _object(_get(obj, "mark", "mark"), "mark")
    name = _get(mark, "name", "mark.name")
    if not isinstance(name, str):
        raise ProtocolViolation(f"mark.name must be a string, got {show(name)}.")
    return name


def _check_stream_sid(obj: Mapping[str, object], expected: str, event: str) -> None:
    sid = obj.get("streamSid")
    if sid != expected:
        raise ProtocolViolation(
            f"{event} event has streamSid {show(sid)} but the stream is {expected!r}; "
            "send the streamSid from the start event."
        )


class TwilioSender:
    """Builds the probe's Twilio events in order: connected, start, media/mark..., stop.

    Each method returns one JSON text frame. Calling them out of order raises `ProtocolError`.
    """

    def __init__(
        self,
        stream_sid: str,
        call_sid: str,
        session: str,
        traceparent: TraceContext,
        tracestate: str | None = None,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        *,
        sink: str | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        self.stream_sid = _sid(stream_sid, "stream_sid")
        self.call_sid = _sid(call_sid, "call_sid")
        self.account_sid = _sid(account_sid, "account_sid")
        meta = MappingProxyType({}) if meta is None else meta
        for key in _RESERVED_PARAMETERS:
            if key in meta:
                raise ProtocolError(f"meta key {key!r} is reserved for the start parameter itself.")
        # Built only to validate session, trace context, sink and meta in one place.
        self.ingress = IngressStart(
            session=session,
            traceparent=traceparent,
            audio=TWILIO_AUDIO,
            tracestate=tracestate,
            sink=sink,
            meta=meta,
        )
        self._state: Literal["new", "connected", "started", "stopped"] = "new"
        self._sequence = 0
        self._chunk = 0
        self._samples = 0

    @property
    def samples_sent(self) -> int:
        """Samples (bytes of mu-law) sent in media events so far."""
        return self._samples

    def _next_sequence(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def _require(self, state: str, action: str) -> None:
        if self._state != state:
            raise ProtocolError(f"cannot send {action} in state {self._state!r}; {_ORDER}.")

    def connected(self) -> str:
        """The first event: `{"event": "connected", "protocol": "Call", "version": "1.0.0"}`."""
        self._require("new", "connected")
        self._state = "connected"
        return _dumps({"event": "connected", "protocol": _PROTOCOL, "version": _VERSION})

    def start(self) -> str:
        """The `start` event (sequenceNumber 1), carrying session and trace context."""
        self._require("connected", "start")
        self._state = "started"
        parameters: dict[str, str] = {
            "session": self.ingress.session,
            "traceparent": str(self.ingress.traceparent),
        }
        if self.ingress.tracestate is not None:
            parameters["tracestate"] = self.ingress.tracestate
        if self.ingress.sink is not None:
            parameters["sink"] = self.ingress.sink
        parameters.update(self.ingress.meta)
        return _dumps(
            {
                "event": "start",
                "sequenceNumber": self._next_sequence(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": [_TRACK],
                    "customParameters": parameters,
                    "mediaFormat": {
                        "encoding": TWILIO_ENCODING,
                        "sampleRate": TWILIO_SAMPLE_RATE,
                        "channels": 1,
                    },
                },
                "streamSid": self.stream_sid,
            }
        )

    def media(self, payload: bytes) -> str:
        """A `media` event for `payload` (raw mu-law); timestamp is where it starts, in ms."""
        self._require("started", "media")
        data = _b64(payload)
        self._chunk += 1
        timestamp = self._samples * 1000 // TWILIO_SAMPLE_RATE
        self._samples += len(payload)
        return _dumps(
            {
                "event": "media",
                "sequenceNumber": self._next_sequence(),
                "media": {
                    "track": _TRACK,
                    "chunk": str(self._chunk),
                    "timestamp": str(timestamp),
                    "payload": data,
                },
                "streamSid": self.stream_sid,
            }
        )

    def mark(self, name: str) -> str:
        """A `mark` event named `name`."""
        self._require("started", "mark")
        if not isinstance(name, str):
            raise TypeError(f"mark name must be a string, not {type(name).__name__}")
        return _dumps(
            {
                "event": "mark",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    def stop(self) -> str:
        """The last event: `stop`, with the account and call SIDs."""
        self._require("started", "stop")
        self._state = "stopped"
        return _dumps(
            {
                "event": "stop",
                "sequenceNumber": self._next_sequence(),
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid,
            }
        )


_ORDER = "the order is connected, start, then media or mark, then stop"


class TwilioResponder:
    """Builds a system's outbound Twilio events for one stream: `media`, `mark`, `clear`."""

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = _sid(stream_sid, "stream_sid")

    def media(self, payload: bytes) -> str:
        """A `media` event carrying `payload` (raw 8 kHz mu-law) to play to the caller."""
        return _dumps(
            {"event": "media", "streamSid": self.stream_sid, "media": {"payload": _b64(payload)}}
        )

    def mark(self, name: str) -> str:
        """A `mark` event named `name`, placed after the media sent so far."""
        if not isinstance(name, str):
            raise TypeError(f"mark name must be a string, not {type(name).__name__}")
        return _dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def clear(self) -> str:
        """A `clear` event: drop media sent but not yet played."""
        return _dumps({"event": "clear", "streamSid": self.stream_sid})


def _parse_start(obj: Mapping[str, object]) -> tuple[IngressStart, str, str, str]:
    start = _object(_get(obj, "start", "start"), "start")
    stream_sid = _sid(_get(start, "streamSid", "start.streamSid"), "start.streamSid")
    call_sid = _sid(_get(start, "callSid", "start.callSid"), "start.callSid")
    account_sid = _sid(_get(start, "accountSid", "start.accountSid"), "start.accountSid")
    top_sid = obj.get("streamSid")
    if top_sid is not None and top_sid != stream_sid:
        raise ProtocolViolation(
            f"streamSid {show(top_sid)} differs from start.streamSid {stream_sid!r}; "
            "they must be equal."
        )
    fmt = _object(_get(start, "mediaFormat", "start.mediaFormat"), "start.mediaFormat")
    expected: tuple[tuple[str, object], ...] = (
        ("encoding", TWILIO_ENCODING),
        ("sampleRate", TWILIO_SAMPLE_RATE),
        ("channels", 1),
    )
    for key, want in expected:
        got = _get(fmt, key, f"start.mediaFormat.{key}")
        if got != want or isinstance(got, bool):
            raise ProtocolViolation(
                f"start.mediaFormat.{key} must be {want!r}, got {show(got)}.",
                close_code=CLOSE_UNSUPPORTED,
            )
    params = _object(
        _get(start, "customParameters", "start.customParameters"), "start.customParameters"
    )
    for key, value in params.items():
        if not isinstance(value, str):
            raise ProtocolViolation(
                f"start.customParameters.{key} must be a string, got {show(value)}."
            )
    session = _get(params, "session", "start.customParameters.session")
    if not isinstance(session, str):  # already checked above; narrows the type
        raise ProtocolViolation("start.customParameters.session must be a string.")
    try:
        traceparent = parse_traceparent(
            _get(params, "traceparent", "start.customParameters.traceparent"),
            key="start.customParameters.traceparent",
        )
        tracestate_raw = params.get("tracestate")
        tracestate = (
            None
            if tracestate_raw is None
            else validate_tracestate(tracestate_raw, key="start.customParameters.tracestate")
        )
        sink = params.get("sink")
        ingress = IngressStart(
            session=session,
            traceparent=traceparent,
            audio=TWILIO_AUDIO,
            tracestate=tracestate,
            sink=None if sink is None else str(sink),
            meta={k: str(v) for k, v in params.items() if k not in _RESERVED_PARAMETERS},
        )
    except ProtocolError as exc:
        # The message names the bare key; say where it sits in a Twilio start.
        text = str(exc)
        for key in ("session", "sink"):
            if text.startswith(f"{key} "):
                text = f"start.customParameters.{text}"
        raise ProtocolViolation(text) from None
    return ingress, stream_sid, call_sid, account_sid


class TwilioReceiver:
    """System side of a Twilio Media Stream: reads the probe's (or Twilio's) events.

    Yields `Started` (an `IngressStart` from `start.customParameters`, audio always 8 kHz mu-law),
    `Audio` for each inbound `media` payload, `Mark`, and `Stopped` once. `connected`, `dtmf` and
    unknown events are ignored; media, mark or stop before `start`, a second `start`, a media event
    for another stream, binary frames and text that is not a JSON object raise `ProtocolViolation`.
    """

    def __init__(self) -> None:
        self._state: Literal["waiting", "streaming", "stopped"] = "waiting"
        self._start: IngressStart | None = None
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.account_sid: str | None = None
        self._error: ProtocolViolation | None = None

    @property
    def start(self) -> IngressStart | None:
        return self._start

    @property
    def stopped(self) -> bool:
        return self._state == "stopped"

    def receive_text(self, text: str | bytes) -> list[TwilioEvent]:
        """Feed one text frame; return the events it makes."""
        if self._error is not None:
            raise self._error
        if self._state == "stopped":
            return []
        try:
            return self._text(text)
        except ProtocolViolation as exc:
            self._error = exc
            raise

    def receive_binary(self, data: bytes) -> list[TwilioEvent]:
        """Binary frames are not part of Twilio Media Streams: always a violation (1003)."""
        if self._error is not None:
            raise self._error
        if self._state == "stopped":
            return []
        self._error = ProtocolViolation(
            "Twilio Media Streams carry audio in JSON media events, not binary frames.",
            close_code=CLOSE_UNSUPPORTED,
        )
        raise self._error

    def _text(self, text: str | bytes) -> list[TwilioEvent]:
        obj = decode_object(text, what="Twilio message")
        kind = _event(obj)
        if kind == "start":
            if self._state != "waiting":
                raise ProtocolViolation("a second start event arrived; Twilio sends start once.")
            ingress, self.stream_sid, self.call_sid, self.account_sid = _parse_start(obj)
            self._start = ingress
            self._state = "streaming"
            return [Started(ingress)]
        if kind not in ("media", "mark", "stop"):
            return []
        if self.stream_sid is None:
            raise ProtocolViolation(
                f"a {kind} event arrived before the start event; send connected and start first.",
                close_code=CLOSE_POLICY,
            )
        _check_stream_sid(obj, self.stream_sid, kind)
        if kind == "stop":
            self._state = "stopped"
            return [Stopped()]
        if kind == "mark":
            return [Mark(_mark_name(obj))]
        media = _object(_get(obj, "media", "media"), "media")
        track = media.get("track")
        payload = _payload(media)
        if track is not None and track != _TRACK:
            return []
        return [Audio(payload)] if payload else []


class TwilioReturnReceiver:
    """Probe side of a Twilio Media Stream: reads the system's `media`, `mark` and `clear`.

    Every event must carry the stream's `streamSid`; unknown events are ignored; binary frames
    and text that is not a JSON object raise `ProtocolViolation`.
    """

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = _sid(stream_sid, "stream_sid")
        self._error: ProtocolViolation | None = None

    @property
    def audio_format(self) -> AudioFormat:
        return TWILIO_AUDIO

    def receive_text(self, text: str | bytes) -> list[TwilioReturnEvent]:
        """Feed one text frame; return the events it makes."""
        if self._error is not None:
            raise self._error
        try:
            obj = decode_object(text, what="Twilio message")
            kind = _event(obj)
            if kind not in ("media", "mark", "clear"):
                return []
            _check_stream_sid(obj, self.stream_sid, kind)
            if kind == "clear":
                return [Clear()]
            if kind == "mark":
                return [Mark(_mark_name(obj))]
            payload = _payload(_object(_get(obj, "media", "media"), "media"))
            return [Audio(payload)] if payload else []
        except ProtocolViolation as exc:
            self._error = exc
            raise

    def receive_binary(self, data: bytes) -> list[TwilioReturnEvent]:
        """Binary frames are not part of Twilio Media Streams: always a violation (1003)."""
        if self._error is None:
            self._error = ProtocolViolation(
                "Twilio Media Streams carry audio in JSON media events, not binary frames.",
                close_code=CLOSE_UNSUPPORTED,
            )
        raise self._error
