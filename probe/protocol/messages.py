"""The JSON text messages of PROTOCOL.md sections 1 and 2: parse, validate, build.

Every message is a frozen dataclass that validates itself, so a value that exists is valid.
`parse_message` turns one text frame into one of them; `to_json` is its inverse. Parsing follows
the protocol's compatibility rule: unknown keys are ignored and unknown message types come back as
`Unknown`, never as an error. Everything else that is wrong raises `ProtocolViolation` with one
sentence that names the key, and the WebSocket close code a receiver should use.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeAlias, overload
from urllib.parse import urlsplit

from probe.errors import ProtocolError
from probe.protocol._util import show
from probe.protocol.trace import TraceContext, parse_traceparent, validate_tracestate

__all__ = [
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_UNSUPPORTED",
    "ENCODINGS",
    "MAX_CLOSE_REASON_BYTES",
    "SAMPLE_RATE_MAX",
    "SAMPLE_RATE_MIN",
    "AudioFormat",
    "Encoding",
    "ForkStart",
    "IngressStart",
    "Message",
    "ProtocolViolation",
    "ReturnStart",
    "Role",
    "Stop",
    "Unknown",
    "decode_object",
    "parse_audio_format",
    "parse_message",
    "to_json",
]

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
# RFC 6455 5.5: a control frame payload is at most 125 bytes, two of which hold the code.
MAX_CLOSE_REASON_BYTES = 123

Encoding: TypeAlias = Literal["pcm_s16le", "pcm_f32le", "mulaw", "alaw"]
ENCODINGS: frozenset[str] = frozenset({"pcm_s16le", "pcm_f32le", "mulaw", "alaw"})
_SAMPLE_WIDTH: Mapping[str, int] = MappingProxyType(
    {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
)
SAMPLE_RATE_MIN = 8000
SAMPLE_RATE_MAX = 48000

Role: TypeAlias = Literal["ingress", "fork", "return"]

_SESSION = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HOP = re.compile(r"[A-Za-z0-9._-]{1,64}")
_URL_CHARS = re.compile(r"[\x21-\x7e]+")
_SINK_MAX_LENGTH = 2048


class ProtocolViolation(ProtocolError):
    """A peer broke the protocol; `close_code` is the WebSocket close code to answer with.

    `CLOSE_UNSUPPORTED` (1003) when the peer's audio format is one we cannot take,
    `CLOSE_POLICY` (1008) for everything else. `reason` is the message cut to fit a close frame.
    """

    def __init__(self, message: str, *, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(message)
        self.close_code = close_code

    @property
    def reason(self) -> str:
        """The message, shortened to at most 123 UTF-8 bytes for a WebSocket close frame."""
        text = str(self)
        data = text.encode("utf-8")
        if len(data) <= MAX_CLOSE_REASON_BYTES:
            return text
        cut = data[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", errors="ignore")
        return cut + "..."


# --- field validators: object in, typed value out, one sentence naming the key on failure ------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encoding(value: object, key: str) -> Encoding:
    if not isinstance(value, str):
        raise ProtocolViolation(f"{key} must be a string, got {show(value)}.")
    if value == "pcm_s16le":
        return "pcm_s16le"
    if value == "pcm_f32le":
        return "pcm_f32le"
    if value == "mulaw":
        return "mulaw"
    if value == "alaw":
        return "alaw"
    raise ProtocolViolation(
        f"{key} {show(value)} is not supported; use pcm_s16le, pcm_f32le, mulaw or alaw.",
        close_code=CLOSE_UNSUPPORTED,
    )


def _sample_rate(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolViolation(f"{key} must be an integer, got {show(value)}.")
    if not SAMPLE_RATE_MIN <= value <= SAMPLE_RATE_MAX:
        raise ProtocolViolation(
            f"{key} must be from {SAMPLE_RATE_MIN} to {SAMPLE_RATE_MAX} Hz, got {value}.",
            close_code=CLOSE_UNSUPPORTED,
        )
    return value


def _channels(value: object, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolViolation(f"{key} must be an integer, got {show(value)}.")
    if value < 1:
        raise ProtocolViolation(
            f"{key} must be at least 1, got {value}.", close_code=CLOSE_UNSUPPORTED
        )
    return value


def _session(value: object, key: str = "session") -> str:
    if not isinstance(value, str) or not _SESSION.fullmatch(value):
        raise ProtocolViolation(
            f"{key} must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {show(value)}."
        )
    return value


def _hop(value: object, key: str = "hop") -> str:
    if not isinstance(value, str) or not _HOP.fullmatch(value):
        raise ProtocolViolation(
            f"{key} must be 1-64 characters of A-Z a-z 0-9 . _ -, got {show(value)}."
        )
    return value


def _sink(value: object, key: str = "sink") -> str:
    if not isinstance(value, str):
        raise ProtocolViolation(f"{key} must be a ws:// or wss:// URL string, got {show(value)}.")
    if len(value) > _SINK_MAX_LENGTH or not _URL_CHARS.fullmatch(value):
        raise ProtocolViolation(
            f"{key} must be a ws:// or wss:// URL of at most {_SINK_MAX_LENGTH} printable "
            f"ASCII characters without spaces, got {show(value)}."
        )
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ProtocolViolation(f"{key} is not a valid URL ({exc}), got {show(value)}.") from None
    if parts.scheme not in ("ws", "wss"):
        raise ProtocolViolation(f"{key} must use the ws:// or wss:// scheme, got {show(value)}.")
    if not parts.hostname:
        raise ProtocolViolation(
            f"{key} must name a host, like ws://host:port/path, got {show(value)}."
        )
    if parts.fragment or "#" in value:
        raise ProtocolViolation(
            f"{key} must not contain a #fragment (RFC 6455 3), got {show(value)}."
        )
    return value


def _meta(value: object, key: str = "meta") -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ProtocolViolation(f"{key} must be an object of strings, got {show(value)}.")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ProtocolViolation(f"{key} keys must be strings, got {show(k)}.")
        if not isinstance(v, str):
            raise ProtocolViolation(f"{key}.{k} must be a string, got {show(v)}.")
        out[k] = v
    return MappingProxyType(out)


def _tracestate(value: object, key: str = "tracestate") -> str:
    try:
        return validate_tracestate(value, key=key)
    except ProtocolViolation:
        raise
    except ProtocolError as exc:
        raise ProtocolViolation(str(exc)) from None


def _traceparent(value: object, key: str = "traceparent") -> TraceContext:
    if isinstance(value, TraceContext):
        return value
    try:
        return parse_traceparent(value, key=key)
    except ProtocolError as exc:
        raise ProtocolViolation(str(exc)) from None


# --- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """How the binary frames of a stream are encoded (always interleaved, little-endian)."""

    encoding: Encoding
    sample_rate: int
    channels: int = 1

    def __post_init__(self) -> None:
        _encoding(self.encoding, "audio.encoding")
        _sample_rate(self.sample_rate, "audio.sample_rate")
        _channels(self.channels, "audio.channels")

    @property
    def sample_width(self) -> int:
        """Bytes per sample of one channel."""
        return _SAMPLE_WIDTH[self.encoding]

    @property
    def frame_width(self) -> int:
        """Bytes per sample frame (all channels)."""
        return _SAMPLE_WIDTH[self.encoding] * self.channels

    def require_mono(self) -> AudioFormat:
        """Return self if mono; otherwise raise a `ProtocolViolation` to close with 1003."""
        if self.channels != 1:
            raise ProtocolViolation(
                f"audio.channels must be 1 (mono), got {self.channels}.",
                close_code=CLOSE_UNSUPPORTED,
            )
        return self

    def to_dict(self) -> dict[str, object]:
        return {
            "encoding": self.encoding,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
        }


@dataclass(frozen=True, slots=True)
class IngressStart:
    """First message of an ingress stream, probe -> system under test (PROTOCOL.md 1.1)."""

    session: str
    traceparent: TraceContext
    audio: AudioFormat
    tracestate: str | None = None
    sink: str | None = None
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        _session(self.session)
        if not isinstance(self.traceparent, TraceContext):
            raise ProtocolViolation(
                f"traceparent must be a TraceContext, got {show(self.traceparent)}."
            )
        if not isinstance(self.audio, AudioFormat):
            raise ProtocolViolation(f"audio must be an AudioFormat, got {show(self.audio)}.")
        if self.tracestate is not None:
            _tracestate(self.tracestate)
        if self.sink is not None:
            _sink(self.sink)
        # A private read-only copy: the caller's dict cannot change a frozen message later.
        object.__setattr__(self, "meta", _meta(self.meta))


@dataclass(frozen=True, slots=True)
class ForkStart:
    """First message of a fork stream, hop -> probe's sink (PROTOCOL.md 2.1)."""

    hop: str
    audio: AudioFormat
    session: str | None = None
    traceparent: TraceContext | None = None
    tracestate: str | None = None

    def __post_init__(self) -> None:
        _hop(self.hop)
        if not isinstance(self.audio, AudioFormat):
            raise ProtocolViolation(f"audio must be an AudioFormat, got {show(self.audio)}.")
        if self.session is not None:
            _session(self.session)
        if self.traceparent is not None and not isinstance(self.traceparent, TraceContext):
            raise ProtocolViolation(
                f"traceparent must be a TraceContext, got {show(self.traceparent)}."
            )
        if self.tracestate is not None:
            if self.traceparent is None:
                raise ProtocolViolation("tracestate was given without a traceparent; add one.")
            _tracestate(self.tracestate)


@dataclass(frozen=True, slots=True)
class ReturnStart:
    """A system's own `start` on the return direction: only its audio format matters (1.4)."""

    audio: AudioFormat

    def __post_init__(self) -> None:
        if not isinstance(self.audio, AudioFormat):
            raise ProtocolViolation(f"audio must be an AudioFormat, got {show(self.audio)}.")


@dataclass(frozen=True, slots=True)
class Stop:
    """End of a stream: `{"type": "stop"}`."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message whose `type` this version does not understand; receivers ignore it."""

    type: str
    raw: dict[str, object] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str):
            raise ProtocolViolation(f"type must be a string, got {show(self.type)}.")


Message: TypeAlias = IngressStart | ForkStart | ReturnStart | Stop | Unknown


# --- parsing -----------------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # json reads 1e999 as inf, which no JSON encoder can write back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def decode_object(text: str | bytes, *, what: str = "message") -> dict[str, object]:
    """Decode one text frame into a JSON object, or raise `ProtocolViolation` (1008)."""
    if isinstance(text, bytes | bytearray | memoryview):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{what} is not valid UTF-8 text.") from None
    if not isinstance(text, str):
        raise ProtocolViolation(f"{what} must be text, got {show(text)}.")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ProtocolViolation(
            f"{what} is not valid JSON ({exc.msg} at character {exc.pos})."
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolViolation(f"{what} is not valid JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise ProtocolViolation(f"{what} must be a JSON object, got {show(value)}.")
    return value


_ABSENT = object()


def _required(obj: Mapping[str, object], key: str, path: str) -> object:
    value = obj.get(key, _ABSENT)
    if value is _ABSENT or value is None:
        raise ProtocolViolation(f"start message is missing the required key '{path}'.")
    return value


def _optional(obj: Mapping[str, object], key: str) -> object | None:
    # JSON null counts as absent: some peers write optional keys as null.
    return obj.get(key)


def parse_audio_format(value: object, *, key: str = "audio") -> AudioFormat:
    """Parse an `audio` object ({"encoding", "sample_rate", "channels"})."""
    if not isinstance(value, dict):
        raise ProtocolViolation(f"{key} must be an object, got {show(value)}.")
    encoding = _encoding(_required(value, "encoding", f"{key}.encoding"), f"{key}.encoding")
    rate = _sample_rate(_required(value, "sample_rate", f"{key}.sample_rate"), f"{key}.sample_rate")
    channels = _channels(_required(value, "channels", f"{key}.channels"), f"{key}.channels")
    return AudioFormat(encoding, rate, channels)


def _parse_ingress_start(obj: dict[str, object]) -> IngressStart:
    session = _session(_required(obj, "session", "session"))
    traceparent = _traceparent(_required(obj, "traceparent", "traceparent"))
    audio = parse_audio_format(_required(obj, "audio", "audio"))
    tracestate = _optional(obj, "tracestate")
    sink = _optional(obj, "sink")
    meta = _optional(obj, "meta")
    return IngressStart(
        session=session,
        traceparent=traceparent,
        audio=audio,
        tracestate=None if tracestate is None else _tracestate(tracestate),
        sink=None if sink is None else _sink(sink),
        meta=MappingProxyType({}) if meta is None else _meta(meta),
    )


def _parse_fork_start(obj: dict[str, object]) -> ForkStart:
    hop = _hop(_required(obj, "hop", "hop"))
    audio = parse_audio_format(_required(obj, "audio", "audio"))
    session = _optional(obj, "session")
    traceparent_raw = _optional(obj, "traceparent")
    traceparent = None if traceparent_raw is None else _traceparent(traceparent_raw)
    tracestate = _optional(obj, "tracestate")
    return ForkStart(
        hop=hop,
        audio=audio,
        session=None if session is None else _session(session),
        traceparent=traceparent,
        # W3C: tracestate means nothing without a traceparent, so it is dropped, not refused.
        tracestate=None if tracestate is None or traceparent is None else _tracestate(tracestate),
    )


@overload
def parse_message(
    text: str | bytes, *, role: Literal["ingress"]
) -> IngressStart | Stop | Unknown: ...


@overload
def parse_message(text: str | bytes, *, role: Literal["fork"]) -> ForkStart | Stop | Unknown: ...


@overload
def parse_message(
    text: str | bytes, *, role: Literal["return"]
) -> ReturnStart | Stop | Unknown: ...


@overload
def parse_message(text: str | bytes, *, role: Role) -> Message: ...


def parse_message(text: str | bytes, *, role: Role) -> Message:
    """Parse one text frame of an ingress, fork or return stream into a message.

    Raises `ProtocolViolation` (a `ProtocolError`) naming the offending key; message types this
    version does not know come back as `Unknown`.
    """
    if role not in ("ingress", "fork", "return"):
        raise ValueError(f"role must be 'ingress', 'fork' or 'return', not {role!r}")
    obj = decode_object(text)
    kind = obj.get("type", _ABSENT)
    if kind is _ABSENT:
        raise ProtocolViolation("message has no 'type' key; every message needs one.")
    if not isinstance(kind, str):
        raise ProtocolViolation(f"message key 'type' must be a string, got {show(kind)}.")
    if kind == "stop":
        return Stop()
    if kind != "start":
        return Unknown(kind, obj)
    if role == "ingress":
        return _parse_ingress_start(obj)
    if role == "fork":
        return _parse_fork_start(obj)
    return ReturnStart(parse_audio_format(_required(obj, "audio", "audio")))


# --- building ----------------------------------------------------------------------------------


def _dumps(obj: Mapping[str, object]) -> str:
    # ASCII-only output: a lone surrogate in meta can then never break UTF-8 on the wire.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def to_json(msg: Message) -> str:
    """Compact JSON text of a message; absent optional keys are omitted."""
    out: dict[str, object]
    if isinstance(msg, IngressStart):
        out = {"type": "start", "session": msg.session, "traceparent": str(msg.traceparent)}
        if msg.tracestate is not None:
            out["tracestate"] = msg.tracestate
        out["audio"] = msg.audio.to_dict()
        if msg.sink is not None:
            out["sink"] = msg.sink
        if msg.meta:
            out["meta"] = dict(msg.meta)
    elif isinstance(msg, ForkStart):
        out = {"type": "start", "hop": msg.hop}
        if msg.session is not None:
            out["session"] = msg.session
        if msg.traceparent is not None:
            out["traceparent"] = str(msg.traceparent)
        if msg.tracestate is not None:
            out["tracestate"] = msg.tracestate
        out["audio"] = msg.audio.to_dict()
    elif isinstance(msg, ReturnStart):
        out = {"type": "start", "audio": msg.audio.to_dict()}
    elif isinstance(msg, Stop):
        out = {"type": "stop"}
    elif isinstance(msg, Unknown):
        out = {"type": msg.type}
        out.update((k, v) for k, v in msg.raw.items() if k != "type")
    else:
        raise TypeError(f"not a protocol message: {msg!r}")
    return _dumps(out)
