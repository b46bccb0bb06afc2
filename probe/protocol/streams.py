"""Sans-I/O receivers for one WebSocket connection of PROTOCOL.md sections 1 and 2.

A shell hands each received frame to `receive_text` or `receive_binary` and gets a list of events
back; it owns the socket, these classes own the rules:

- Ingress and fork streams must open with a `start` text frame. Audio before it, `stop` before it,
  or a text frame that is not a JSON object raise `ProtocolViolation` carrying the close code to
  answer with (1003 for an audio format we cannot take, 1008 for anything else). Messages of
  unknown type are ignored wherever they come, as the protocol's compatibility rule asks.
- A later `start` announces a format change and yields `Started` again; it may not change the
  stream's identity (session, or hop for a fork).
- After `stop`, which yields `Stopped` once, every frame is ignored.
- The return direction (system -> probe) needs no start: binary frames are audio in the ingress
  format until the system sends its own `{"type": "start", "audio": {...}}`; every text frame it
  does not understand is ignored.

Once a receiver has raised, it raises the same violation again on every later frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeAlias, TypeVar

from probe.errors import ProtocolError
from probe.protocol.messages import (
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    AudioFormat,
    ForkStart,
    IngressStart,
    ProtocolViolation,
    ReturnStart,
    Stop,
    Unknown,
    decode_object,
    parse_audio_format,
    parse_message,
)

__all__ = [
    "Audio",
    "Event",
    "ForkEvent",
    "ForkReceiver",
    "IngressEvent",
    "IngressReceiver",
    "ProtocolViolation",
    "ReturnEvent",
    "ReturnReceiver",
    "Started",
    "Stopped",
    "CLOSE_POLICY",
    "CLOSE_UNSUPPORTED",
]

StartT = TypeVar("StartT", IngressStart, ForkStart, ReturnStart)


@dataclass(frozen=True, slots=True)
class Started(Generic[StartT]):
    """The stream (re)started; `msg.audio` is the format of the audio that follows."""

    msg: StartT


@dataclass(frozen=True, slots=True)
class Audio:
    """One binary frame of audio, as received."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stopped:
    """The peer sent `stop`; nothing after it counts."""


IngressEvent: TypeAlias = Started[IngressStart] | Audio | Stopped
ForkEvent: TypeAlias = Started[ForkStart] | Audio | Stopped
ReturnEvent: TypeAlias = Started[ReturnStart] | Audio | Stopped
Event: TypeAlias = IngressEvent | ForkEvent | ReturnEvent

_State = Literal["waiting", "streaming", "stopped"]


class _StartedReceiver(Generic[StartT]):
    """Shared rules of the ingress and fork receivers (both need a start first)."""

    _what: str

    def __init__(self, *, mono_only: bool = True) -> None:
        self._mono_only = mono_only
        self._state: _State = "waiting"
        self._start: StartT | None = None
        self._error: ProtocolViolation | None = None

    @property
    def start(self) -> StartT | None:
        """The latest start message, or None before the first one."""
        return self._start

    @property
    def audio_format(self) -> AudioFormat | None:
        """Format of the audio now arriving, or None before the first start."""
        return None if self._start is None else self._start.audio

    @property
    def stopped(self) -> bool:
        return self._state == "stopped"

    def receive_text(self, text: str | bytes) -> list[Started[StartT] | Audio | Stopped]:
        """Feed one text frame; return the events it makes."""
        self._check_failed()
        if self._state == "stopped":
            return []
        try:
            return self._text(text)
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def receive_binary(self, data: bytes) -> list[Started[StartT] | Audio | Stopped]:
        """Feed one binary frame; return the events it makes."""
        self._check_failed()
        if self._state == "stopped":
            return []
        if self._state == "waiting":
            raise self._fail(
                ProtocolViolation(
                    f"a binary audio frame arrived before the {self._what} start message; "
                    'send {"type": "start", ...} first.'
                )
            )
        if not data:
            return []
        return [Audio(bytes(data))]

    def _text(self, text: str | bytes) -> list[Started[StartT] | Audio | Stopped]:
        msg = self._parse(text)
        if isinstance(msg, Unknown):
            return []
        if isinstance(msg, Stop):
            if self._state == "waiting":
                raise ProtocolViolation(
                    f"stop arrived before the {self._what} start message; send start first."
                )
            self._state = "stopped"
            return [Stopped()]
        if self._mono_only:
            msg.audio.require_mono()
        if self._start is not None:
            self._check_same_stream(self._start, msg)
        self._start = msg
        self._state = "streaming"
        return [Started(msg)]

    def _parse(self, text: str | bytes) -> StartT | Stop | Unknown:
        raise NotImplementedError

    def _check_same_stream(self, old: StartT, new: StartT) -> None:
        raise NotImplementedError

    def _check_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, exc: ProtocolError) -> ProtocolViolation:
        if not isinstance(exc, ProtocolViolation):
            exc = ProtocolViolation(str(exc), close_code=CLOSE_POLICY)
        self._error = exc
        return exc


class IngressReceiver(_StartedReceiver[IngressStart]):
    """System side of an ingress stream (PROTOCOL.md 1): what the probe sends.

    `mono_only` (default) refuses a start whose `audio.channels` is not 1, with close code 1003.
    """

    _what = "ingress"

    def _parse(self, text: str | bytes) -> IngressStart | Stop | Unknown:
        return parse_message(text, role="ingress")

    def _check_same_stream(self, old: IngressStart, new: IngressStart) -> None:
        if new.session != old.session:
            raise ProtocolViolation(
                f"session changed mid-stream from {old.session!r} to {new.session!r}; "
                "open a new connection for a new session."
            )


class ForkReceiver(_StartedReceiver[ForkStart]):
    """Sink side of a fork stream (PROTOCOL.md 2): what a hop mirrors to the probe."""

    _what = "fork"

    def _parse(self, text: str | bytes) -> ForkStart | Stop | Unknown:
        return parse_message(text, role="fork")

    def _check_same_stream(self, old: ForkStart, new: ForkStart) -> None:
        if new.hop != old.hop:
            raise ProtocolViolation(
                f"hop changed mid-stream from {old.hop!r} to {new.hop!r}; "
                "open a new connection for another hop."
            )
        if old.session is not None and new.session is not None and new.session != old.session:
            raise ProtocolViolation(
                f"session changed mid-stream from {old.session!r} to {new.session!r}; "
                "open a new connection for a new session."
            )


class ReturnReceiver:
    """Probe side of the return direction of an ingress connection (PROTOCOL.md 1.4).

    `audio` is the ingress format, which binary frames use until the system sends its own start.
    A start whose `audio` is present but unusable raises `ProtocolViolation` (the audio after it
    could not be read); a start without `audio`, non-JSON text and unknown messages are ignored.
    """

    def __init__(self, audio: AudioFormat, *, mono_only: bool = True) -> None:
        if not isinstance(audio, AudioFormat):
            raise TypeError(f"audio must be an AudioFormat, not {type(audio).__name__}")
        self._audio = audio
        self._mono_only = mono_only
        self._stopped = False
        self._error: ProtocolViolation | None = None

    @property
    def audio_format(self) -> AudioFormat:
        """Format of the return audio now arriving."""
        return self._audio

    @property
    def stopped(self) -> bool:
        return self._stopped

    def receive_text(self, text: str | bytes) -> list[ReturnEvent]:
        """Feed one text frame; return the events it makes."""
        if self._error is not None:
            raise self._error
        if self._stopped:
            return []
        try:
            obj = decode_object(text)
        except ProtocolError:
            return []
        kind = obj.get("type")
        if kind == "stop":
            self._stopped = True
            return [Stopped()]
        if kind != "start" or obj.get("audio") is None:
            return []
        try:
            audio = parse_audio_format(obj["audio"])
            if self._mono_only:
                audio.require_mono()
        except ProtocolViolation as exc:
            self._error = exc
            raise
        self._audio = audio
        return [Started(ReturnStart(audio))]

    def receive_binary(self, data: bytes) -> list[ReturnEvent]:
        """Feed one binary frame; return the events it makes."""
        if self._error is not None:
            raise self._error
        if self._stopped or not data:
            return []
        return [Audio(bytes(data))]
