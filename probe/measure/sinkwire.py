"""The messages between a probe process and its sink child process, typed, with their framing.

Parent to child: :class:`OpenStream`, :class:`StreamAudio`, :class:`StreamFormat`,
:class:`CloseStream` (detection streams the parent hands over, e.g. a session's return audio),
:class:`Expect` (a marker was sent: informed detection looks for it), :class:`Drain` and
:class:`Stop`, sent in batches (:class:`Batch`).

Child to parent: :class:`Ready` or :class:`Failed` once, then :class:`Detected`,
:class:`HopJoined`, :class:`HopFailed`, :class:`HopSilent`, :class:`ForkRejected` (what the
child's sink and streams tell the registry),
:class:`Health` every second (how far detection lags and the child's CPU, for the generator's
health, :mod:`probe.measure.health`), :class:`Drained` and :class:`Stopped`; detections come in
a :class:`Batch` when one piece of detection work found several.

On the wire each message is a plain tuple ``(tag, *fields)`` (:func:`to_wire`, :func:`from_wire`):
pickling a tuple costs a fraction of a dataclass instance, and there are thousands a second. A
frame is what :class:`multiprocessing.connection.Connection` writes (a 4-byte big-endian length,
then a pickle; :func:`encode` and :class:`Reader`), so a blocking ``Connection`` on one side and a
cooperative socket on the other interoperate. Pure: no I/O.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

from probe.protocol import AudioFormat, TraceContext

__all__ = [
    "Batch",
    "CloseStream",
    "Detected",
    "Drain",
    "Drained",
    "Expect",
    "Failed",
    "ForkRejected",
    "Health",
    "HopFailed",
    "HopJoined",
    "HopSilent",
    "Message",
    "OpenStream",
    "Reader",
    "Ready",
    "RegistryEvents",
    "Stop",
    "Stopped",
    "StreamAudio",
    "StreamFormat",
    "encode",
    "from_wire",
    "to_wire",
]

_HEADER = struct.Struct("!i")
_HEADER64 = struct.Struct("!Q")


class RegistryEvents(Protocol):
    """What a sink and its hop streams tell a registry (a :class:`SessionRegistry`, or the
    child's forwarder of these calls to the parent's)."""

    def hop_connected(
        self, hop: str, session_id: str | None, trace: TraceContext | None = None
    ) -> None: ...

    def hop_error(self, hop: str, session_id: str | None, error: str) -> None: ...

    def hop_silent(self, hop: str, session_id: str, since: float | None) -> None: ...

    def fork_rejected(self, reason: str) -> None: ...

    def record_detection(
        self,
        hop: str,
        payload: bytes,
        arrival_time: float,
        *,
        score: float,
        session_hint: str | None = None,
    ) -> object: ...


class Message:
    """Base of every message; ``TAG`` names it on the wire."""

    TAG: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class OpenStream(Message):
    TAG: ClassVar[str] = "open"
    sid: int
    hop: str
    audio: AudioFormat
    session: str


@dataclass(frozen=True, slots=True)
class StreamAudio(Message):
    TAG: ClassVar[str] = "audio"
    sid: int
    data: bytes
    arrival: float


@dataclass(frozen=True, slots=True)
class StreamFormat(Message):
    TAG: ClassVar[str] = "fmt"
    sid: int
    audio: AudioFormat


@dataclass(frozen=True, slots=True)
class CloseStream(Message):
    TAG: ClassVar[str] = "close"
    sid: int


@dataclass(frozen=True, slots=True)
class Expect(Message):
    TAG: ClassVar[str] = "expect"
    session: str
    payload: bytes
    send_time: float
    deadline: float


@dataclass(frozen=True, slots=True)
class Drain(Message):
    TAG: ClassVar[str] = "drain"
    seq: int


@dataclass(frozen=True, slots=True)
class Stop(Message):
    TAG: ClassVar[str] = "stop"


@dataclass(frozen=True, slots=True)
class Batch(Message):
    """Messages written together: parent to child (one pickle, one hand-over in the child), and
    the child's detections of one piece of detection work (one pickle, one write)."""

    TAG: ClassVar[str] = "batch"
    messages: tuple[tuple[Any, ...], ...]  # wire tuples


@dataclass(frozen=True, slots=True)
class Ready(Message):
    TAG: ClassVar[str] = "ready"
    url: str


@dataclass(frozen=True, slots=True)
class Failed(Message):
    """The child could not start its sink (one sentence)."""

    TAG: ClassVar[str] = "error"
    error: str


@dataclass(frozen=True, slots=True)
class Detected(Message):
    TAG: ClassVar[str] = "det"
    hop: str
    payload: bytes
    arrival: float
    score: float
    hint: str | None


@dataclass(frozen=True, slots=True)
class HopJoined(Message):
    TAG: ClassVar[str] = "hop"
    hop: str
    session: str | None
    trace: TraceContext | None


@dataclass(frozen=True, slots=True)
class HopFailed(Message):
    TAG: ClassVar[str] = "hop_error"
    hop: str
    session: str | None
    error: str


@dataclass(frozen=True, slots=True)
class ForkRejected(Message):
    """The sink refused a fork connection, for ``reason`` (no or a wrong capability)."""

    TAG: ClassVar[str] = "fork_rejected"
    reason: str


@dataclass(frozen=True, slots=True)
class HopSilent(Message):
    """A session's fork of ``hop`` sent nothing since ``since`` (its last frame's arrival), or,
    with ``since`` None, sends again."""

    TAG: ClassVar[str] = "hop_silent"
    hop: str
    session: str
    since: float | None


@dataclass(frozen=True, slots=True)
class Drained(Message):
    TAG: ClassVar[str] = "drained"
    seq: int


@dataclass(frozen=True, slots=True)
class Stopped(Message):
    TAG: ClassVar[str] = "stopped"


@dataclass(frozen=True, slots=True)
class Health(Message):
    """The longest any detection work waited since the last report (work still queued
    included; return audio from its arrival at the parent), the share of a core the child used
    over the last second (negative: not measured in this report), and the frames it shed
    meanwhile (audio that waited past the marker timeout, dropped unsearched to catch up)."""

    TAG: ClassVar[str] = "health"
    delay_s: float
    cpu: float
    shed: int = 0


_KINDS: tuple[type[Message], ...] = (
    OpenStream, StreamAudio, StreamFormat, CloseStream, Expect, Drain, Stop, Batch,
    Ready, Failed, Detected, HopJoined, HopFailed, HopSilent, ForkRejected, Drained, Stopped,
    Health,
)
_BY_TAG: dict[str, type[Message]] = {k.TAG: k for k in _KINDS}
_FIELDS: dict[type[Message], tuple[str, ...]] = {
    k: tuple(f.name for f in fields(k)) for k in _KINDS  # type: ignore[arg-type]
}


def to_wire(msg: Message) -> tuple[Any, ...]:
    """``msg`` as the tuple that goes in a pickle."""
    return (msg.TAG, *(getattr(msg, name) for name in _FIELDS[type(msg)]))


def from_wire(item: Any) -> Message:
    """The message a wire tuple carries; ValueError for anything else."""
    if not isinstance(item, tuple) or not item or not isinstance(item[0], str) or (
        item[0] not in _BY_TAG
    ):
        raise ValueError(f"not a sink message: {item!r:.80}")
    kind = _BY_TAG[item[0]]
    try:
        return kind(*item[1:])
    except TypeError as exc:
        raise ValueError(f"malformed {kind.__name__} message: {exc}") from None


def encode(msg: Message) -> bytes:
    """``msg`` framed as :meth:`multiprocessing.connection.Connection.send` frames it."""
    body = pickle.dumps(to_wire(msg))
    if len(body) > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _HEADER64.pack(len(body)) + body
    return _HEADER.pack(len(body)) + body


# The only classes a frame may name (the fields of the messages); anything else in a frame is
# corruption, and must never import or call what it names.
_CLASSES: dict[tuple[str, str], type] = {
    (AudioFormat.__module__, AudioFormat.__qualname__): AudioFormat,
    (TraceContext.__module__, TraceContext.__qualname__): TraceContext,
}
MAX_FRAME = 256 * 1024 * 1024


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CLASSES[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name:.40} is not a message field") from None


class Reader:
    """Bytes in (as a cooperative socket delivers them), messages out.

    A frame that is not a sink message (a bad length, a broken pickle, a class outside the
    messages, a frame over ``max_frame`` bytes) raises ValueError naming the sink channel; the
    channel is unusable from then on.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            start = pos + 4
            if size == -1:  # Connection's header for a message of 2 GiB or more
                if len(buf) - start < 8:
                    break
                (size,) = _HEADER64.unpack_from(buf, start)
                start += 8
            if size < 0 or size > self._max_frame:
                raise ValueError(
                    f"the sink channel sent a frame of {size} bytes (the limit is "
                    f"{self._max_frame}); it is corrupt"
                )
            if len(buf) - start < size:
                break
            body = memoryview(buf)[start : start + size]
            try:
                item = _Unpickler(io.BytesIO(body)).load()
            except Exception as exc:  # noqa: BLE001 - any failure of a pickle is corruption
                raise ValueError(
                    f"the sink channel sent a frame that is not a sink message ({exc!s:.80})"
                ) from None
            finally:
                body.release()
            out.append(from_wire(item))
            pos = start + size
        del buf[:pos]
        return out
