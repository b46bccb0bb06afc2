"""The tee's rules, sans-I/O: what a transparent WebSocket proxy passes on, and which audio it
forks. The shell is :mod:`probe.aio.tee` (``probe tee``).

Handshake. The client's path and query are appended to the upstream URL's path (and its query
joined to the upstream's); every request header is passed on except the hop-by-hop ones (RFC 9110
7.6.1: ``Connection`` and the headers it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade``) and the ones each leg's handshake makes for itself (``Host``,
``Sec-WebSocket-Key`` / ``-Version`` / ``-Accept`` / ``-Extensions`` / ``-Protocol``,
``Content-Length``). The subprotocols the client offers are offered upstream and the one the
upstream picks is the client's; the upstream's response headers come back the same way (``Date``
is the tee's own). Compression is offered upstream only if the client offered it.

Audio. :class:`TeeSniffer` watches both directions of one connection and says when to open a
fork and what audio to write to it: hop ``NAME`` for what the client sends (client -> upstream)
and ``NAME.return`` for what comes back. In the probe dialect the client's ``start`` names the
session, trace context, sink and audio format, its binary frames are audio, and the upstream's
binary frames are return audio in that format unless the upstream sent its own ``start`` with an
``audio`` object first (PROTOCOL.md 1.4). In the Twilio dialect the ``start`` event's
``customParameters`` name session, trace context and sink, and ``media`` payloads (base64 8 kHz
mu-law) are the audio: the client's inbound track one way, the upstream's media the other.
Whatever the first message lacks may come from the handshake (``traceparent`` / ``tracestate``
headers, ``session`` / ``sink`` query parameters). The sink is the one the stream names, else the
tee's ``--sink``; with neither, nothing is forked.

The sniffer never judges: a message it cannot read is relayed all the same and at most noted
once. No sockets here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from probe.protocol import AudioFormat, parse_audio_format
from probe.protocol.messages import ProtocolViolation
from probe.tap.context import MULAW_8K, ForkContext, from_start

__all__ = [
    "Dialect",
    "ForkAudio",
    "Note",
    "OpenFork",
    "TeeEvent",
    "TeeSniffer",
    "offers_deflate",
    "offered_subprotocols",
    "request_headers",
    "response_headers",
    "upstream_url",
]

Dialect: TypeAlias = Literal["probe", "twilio"]
RETURN_SUFFIX = ".return"

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
_PER_LEG = frozenset({
    "host", "content-length", "sec-websocket-key", "sec-websocket-version",
    "sec-websocket-accept", "sec-websocket-extensions", "sec-websocket-protocol",
})


def _passed(headers: Iterable[tuple[str, str]], also: frozenset[str]) -> list[tuple[str, str]]:
    items = list(headers)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = _HOP_BY_HOP | _PER_LEG | also | named
    return [(name, value) for name, value in items if name.lower() not in drop]


def request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's handshake headers to send upstream, in order, repeats kept."""
    return _passed(headers, frozenset())


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's handshake response headers to pass back to the client."""
    return _passed(headers, frozenset({"date"}))


def offered_subprotocols(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The subprotocols a handshake offers (``Sec-WebSocket-Protocol``), in order."""
    return [
        token.strip()
        for name, value in headers
        if name.lower() == "sec-websocket-protocol"
        for token in value.split(",")
        if token.strip()
    ]


def offers_deflate(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a handshake offers the permessage-deflate extension."""
    return any(
        name.lower() == "sec-websocket-extensions" and "permessage-deflate" in value.lower()
        for name, value in headers
    )


def upstream_url(upstream: str, request_path: str) -> str:
    """``upstream`` with the client's request path appended and the queries joined."""
    up = urlsplit(upstream)
    path, _, query = request_path.partition("?")
    base = up.path.rstrip("/")
    joined = base + (path if path.startswith("/") else "/" + path)
    queries = "&".join(q for q in (up.query, query) if q)
    return urlunsplit((up.scheme, up.netloc, joined or "/", queries, ""))


# --- what the sniffer says -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenFork:
    """Open (or re-open, with a new format) the fork of ``hop``."""

    hop: str
    ctx: ForkContext
    audio: AudioFormat
    sink: str


@dataclass(frozen=True, slots=True)
class ForkAudio:
    """Write ``data`` to the fork of ``hop`` (opened before)."""

    hop: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Note:
    """A line for the log: why something is not forked."""

    text: str


TeeEvent: TypeAlias = OpenFork | ForkAudio | Note


class TeeSniffer:
    """One relayed connection's audio, both ways, turned into fork events (module docstring).

    ``handshake`` is what the handshake told (headers and query); ``sink`` is the tee's own
    fallback sink URL. Feed every relayed message with :meth:`client` or :meth:`upstream`."""

    def __init__(
        self, hop: str, dialect: Dialect, *, handshake: ForkContext, sink: str | None,
        peer: str = "the client",
    ) -> None:
        self.hop = hop
        self.return_hop = hop + RETURN_SUFFIX
        self.dialect = dialect
        self.handshake = handshake
        self.default_sink = sink
        self.peer = peer
        self.ctx: ForkContext | None = None  # from the client's start, once seen
        self.sink: str | None = None
        self.open: dict[str, AudioFormat] = {}
        self.return_audio: AudioFormat | None = None
        self._first = True
        self._noted: set[str] = set()

    def _note(self, key: str, text: str) -> list[TeeEvent]:
        if key in self._noted:
            return []
        self._noted.add(key)
        return [Note(text)]

    # -- client -> upstream ---------------------------------------------------------------------

    def client(self, message: str | bytes) -> list[TeeEvent]:
        """A message the client sent (already relayed upstream)."""
        first, self._first = self._first, False
        if self.dialect == "twilio":
            return self._twilio_client(message, first)
        if isinstance(message, str):
            ctx = from_start(message)
            if ctx is not None:
                return self._started(ctx)
        elif self.ctx is not None:
            if self.hop in self.open:
                return [ForkAudio(self.hop, message)]
            return []
        if first:
            kind = "binary" if isinstance(message, bytes) else "text but not a start"
            return self._note(
                "nostart",
                f"{self.peer} sent no start first (its first message was {kind}); relaying "
                "without forking until a start comes",
            )
        return []

    def _twilio_client(self, message: str | bytes, first: bool) -> list[TeeEvent]:
        if isinstance(message, bytes):
            return self._note(
                "binary", f"{self.peer} sent binary frames, which Twilio Media Streams do not "
                "carry; relayed, not forked",
            )
        obj = _json(message)
        kind = obj.get("event") if obj is not None else None
        if kind == "media" and obj is not None:
            if self.hop not in self.open:
                return []
            media = _media(obj)
            if media is None or media[0] not in (None, "inbound") or not media[1]:
                return []
            return [ForkAudio(self.hop, media[1])]
        if kind == "start" and obj is not None:
            ctx = from_start(obj)
            if ctx is not None:
                return self._started(ctx)
        if kind not in ("connected", "start") and self.ctx is None:
            what = f"a {kind!r} event" if isinstance(kind, str) else "a message that is not one"
            return self._note(
                "nostart",
                f"{self.peer} sent {what} before any start event; relaying without forking "
                "until a start comes",
            )
        return []

    def _started(self, found: ForkContext) -> list[TeeEvent]:
        ctx = found.merged(self.handshake)
        out: list[TeeEvent] = [Note(f"{self.peer}: {n}") for n in found.notes]
        self.ctx = ctx
        self.sink = ctx.sink or self.default_sink
        if self.sink is None:
            return out + self._note(
                "nosink",
                f"{self.peer}'s start names no sink and the tee has no --sink; not forking",
            )
        if ctx.audio is None:
            return out + self._note(
                "noaudio", f"{self.peer}'s start has no usable audio format; not forking"
            )
        if self.open.get(self.hop) != ctx.audio:
            self.open[self.hop] = ctx.audio
            out.append(OpenFork(self.hop, ctx, ctx.audio, self.sink))
        return out

    # -- upstream -> client ---------------------------------------------------------------------

    def upstream(self, message: str | bytes) -> list[TeeEvent]:
        """A message the upstream sent (already relayed to the client)."""
        if self.dialect == "twilio":
            if isinstance(message, bytes):
                return []
            obj = _json(message)
            if obj is None or obj.get("event") != "media":
                return []
            media = _media(obj)
            if media is None or not media[1]:
                return []
            return self._return_audio(media[1], MULAW_8K)
        if isinstance(message, str):
            # Cheap test before a full parse: most text of a stream is not a start.
            obj = _json(message) if '"start"' in message else None
            if obj is not None and obj.get("type") == "start" and "audio" in obj:
                try:
                    self.return_audio = parse_audio_format(obj["audio"])
                except ProtocolViolation as exc:
                    return self._note(
                        "badreturn", f"the upstream's start has no usable audio ({exc}); its "
                        "audio is forked in the client's format",
                    )
            return []
        if self.ctx is None or self.ctx.audio is None:
            return []
        return self._return_audio(message, self.return_audio or self.ctx.audio)

    def _return_audio(self, data: bytes, audio: AudioFormat) -> list[TeeEvent]:
        if self.ctx is None or self.sink is None:
            return []
        out: list[TeeEvent] = []
        if self.open.get(self.return_hop) != audio:
            self.open[self.return_hop] = audio
            out.append(OpenFork(self.return_hop, self.ctx, audio, self.sink))
        out.append(ForkAudio(self.return_hop, data))
        return out


def _json(text: str) -> dict[str, object] | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _media(obj: dict[str, object]) -> tuple[str | None, bytes] | None:
    """``(track, payload)`` of a Twilio media event, or None if its payload is not base64."""
    media = obj.get("media")
    if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
        return None
    try:
        payload = base64.b64decode(media["payload"], validate=True)
    except ValueError:
        return None
    track = media.get("track")
    return (track if isinstance(track, str) else None), payload
