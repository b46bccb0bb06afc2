"""``probe tee``: a transparent WebSocket proxy that forks the audio it relays to the probe's sink.

Put it between two components nobody can change (``--listen`` where the client connects,
``--upstream`` where it used to connect) and that link becomes two measured hops: ``NAME`` (what
the client sends, as it leaves the tee) and ``NAME.return`` (what comes back). What is passed on
and what is forked is decided by :mod:`probe.tee`; this shell connects, relays and writes to
:class:`probe.tap.Tap` forks.

- The upstream is connected during the client's handshake, so its answer is the client's: the
  subprotocol it picks, its response headers, and an HTTP refusal (status, headers and body) are
  passed back; an upstream that cannot be reached is answered with HTTP 502 and a log line.
- Every data frame is sent on from the protocol callback that parsed it (no task is woken and
  no message is queued per frame): text as text, binary as binary, fragments as the same
  fragments, in order, before anything is forked (a fork only ever reads what was already sent
  on). A leg whose socket falls behind pauses reading on the other leg until it drains. Measured
  with ``benchmarks/tee_overhead.py`` (100 paced streams of 20 ms frames through an echo), this
  took the tee from 3.2 to 2.35 ms of CPU per stream-second against a ``recv``/``send`` loop.
- A close is passed on with the same code and reason (no code for no code); a connection that
  drops without a close frame is dropped on the other side too (the peer sees 1006).
- Ping and pong frames are answered on each leg, not relayed; each leg keeps its own keepalive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import errno
import logging
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from probe.config import check_url, parse_host_port
from probe.errors import ConfigError
from probe.tap import Tap
from probe.tap.context import from_headers
from probe.tap.core import check_hop
from probe.tee import (
    RETURN_SUFFIX,
    Dialect,
    ForkAudio,
    Note,
    OpenFork,
    TeeEvent,
    TeeSniffer,
    offered_subprotocols,
    offers_deflate,
    request_headers,
    response_headers,
    upstream_url,
)

__all__ = ["Tee", "TeeStats", "add_parser", "command"]

log = logging.getLogger("probe.tee")

OPEN_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 5.0
# The upstream of a handshake the client abandoned (no handler ever ran) is closed after this.
_REAP_S = 30.0
_NO_STATUS = 1005


@dataclass(slots=True)
class TeeStats:
    """What the tee did since it started."""

    connections: int = 0
    upstream_failures: int = 0
    to_upstream: int = 0
    to_client: int = 0
    forks_opened: int = 0
    # Of the forks of connections that ended: frames sent to the sink, and dropped (see
    # probe.tap: a queue over its bound, frames too old to be timed, a lost connection).
    fork_frames: int = 0
    fork_dropped: int = 0


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "a client"
    return f"client {host}:{port}"


def _close_words(code: int | None, reason: str | None) -> str:
    if code is None:
        return "without a close frame"
    if code == _NO_STATUS:
        return "with no close code"
    return f"with {code}" + (f" ({reason})" if reason else "")


_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


class _Leg:
    """What both legs' connection classes add: data frames go to the relay, not to ``recv``."""

    relay: _Relay | None
    held: list[Frame]

    def _intercept(self, event: object) -> bool:
        """True if ``event`` was taken (a data frame); a close frame is told, then processed."""
        if not isinstance(event, Frame):
            return False
        relay = self.relay
        if event.opcode in _DATA:
            if relay is None:
                self.held.append(event)  # before the handler attached the relay
            else:
                relay.forward(self, event)
            return True
        if event.opcode is Opcode.CLOSE and relay is not None:
            relay.closing(self, event)
        return False


class _ServerLeg(_Leg, ServerConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relay = None
        self.held = []

    def process_event(self, event: Any) -> None:
        if not self._intercept(event):
            super().process_event(event)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.relay is not None:
            self.relay.up.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.relay is not None:
            self.relay.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.relay is not None:
            self.relay.lost(self)


class _ClientLeg(_Leg, ClientConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relay = None
        self.held = []

    def process_event(self, event: Any) -> None:
        if not self._intercept(event):
            super().process_event(event)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.relay is not None:
            self.relay.client.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.relay is not None:
            self.relay.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.relay is not None:
            self.relay.lost(self)


class _Relay:
    """One relayed connection: each data frame is sent on to the other leg from the protocol
    callback that parsed it (no task, no message queue: the frames and their fragmentation
    pass as they came), a close frame is passed on as the same close, and the whole messages
    are shown to the sniffer, whose events feed the forks."""

    def __init__(
        self, tee: Tee, client: _ServerLeg, up: _ClientLeg, sniffer: TeeSniffer, peer: str
    ) -> None:
        self.tee = tee
        self.client = client
        self.up = up
        self.sniffer = sniffer
        self.peer = peer
        self.taps: dict[str, Tap] = {}
        self.broken = False
        self.closed_by: str | None = None
        self._parts: dict[_Leg, list[bytes]] = {client: [], up: []}
        self._kind: dict[_Leg, Opcode] = {}

    def attach(self) -> None:
        """Start relaying: frames held since the handshake first, in order."""
        for leg in (self.client, self.up):
            leg.relay = self
            held, leg.held = leg.held, []
            for frame in held:
                self.forward(leg, frame)
        for leg in (self.client, self.up):
            if leg.protocol.close_rcvd is not None:
                self._mirror(leg, leg.protocol.close_rcvd.code, leg.protocol.close_rcvd.reason)
            elif leg.protocol.state is State.CLOSED:
                self.lost(leg)

    def _other(self, leg: _Leg) -> _ServerLeg | _ClientLeg:
        return self.up if leg is self.client else self.client

    def forward(self, src: _Leg, frame: Frame) -> None:
        dst = self._other(src)
        op = frame.opcode
        if dst.protocol.state is State.OPEN:  # else the other side closed: nobody to send to
            try:
                if op is Opcode.BINARY:
                    dst.protocol.send_binary(frame.data, frame.fin)
                elif op is Opcode.TEXT:
                    dst.protocol.send_text(frame.data, frame.fin)
                else:
                    dst.protocol.send_continuation(frame.data, frame.fin)
                dst.send_data()
            except Exception as exc:  # the other leg just failed: its own close tells
                log.debug("tee %s: a frame for %s was lost (%r)", self.tee.hop, dst, exc)
        # Whole messages for the counts and the sniffer (fragments are rare: assembled here).
        parts = self._parts[src]
        if op is not Opcode.CONT:
            self._kind[src] = op
        if not frame.fin:
            parts.append(bytes(frame.data))
            return
        data = b"".join([*parts, bytes(frame.data)]) if parts else frame.data
        parts.clear()
        to_upstream = src is self.client
        if to_upstream:
            self.tee.stats.to_upstream += 1
        else:
            self.tee.stats.to_client += 1
        if self.broken:
            return
        message: str | bytes
        if self._kind[src] is Opcode.TEXT:
            try:
                message = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                return  # relayed as it came; nothing to read in it
        else:
            message = data if type(data) is bytes else bytes(data)
        sniff = self.sniffer.client if to_upstream else self.sniffer.upstream
        try:
            self.apply(sniff(message))
        except Exception as exc:  # forking must never cost the relay
            self.broken = True
            log.error("tee %s: forking %s's stream failed; relaying without forks (%r)",
                      self.tee.hop, self.peer, exc)

    def apply(self, events: list[TeeEvent]) -> None:
        for ev in events:
            if isinstance(ev, ForkAudio):
                tap = self.taps.get(ev.hop)
                if tap is not None:
                    tap.write(ev.data)
            elif isinstance(ev, OpenFork):
                tap = self.taps.get(ev.hop)
                if tap is None:
                    tap = self.taps[ev.hop] = Tap(hop=ev.hop, **self.tee.tap_options)
                    self.tee._taps.add(tap)
                tap.open(
                    ev.ctx.session, ev.ctx.hop_traceparent(), ev.audio,
                    tracestate=ev.ctx.tracestate, sink=ev.sink,
                )
                self.tee.stats.forks_opened += 1
            elif isinstance(ev, Note):
                log.warning("tee %s: %s.", self.tee.hop, ev.text)

    def closing(self, src: _Leg, frame: Frame) -> None:
        close = Close.parse(bytes(frame.data))
        self._mirror(src, close.code, close.reason)

    def _mirror(self, src: _Leg, code: int | None, reason: str) -> None:
        to_upstream = src is self.client
        if self.closed_by is None:
            self.closed_by = "client" if to_upstream else "upstream"
            level = logging.INFO if code in (1000, 1001) else logging.WARNING
            log.log(level, "tee %s: %s closed %s; closing %s the same way.", self.tee.hop,
                    self.peer if to_upstream else "the upstream", _close_words(code, reason),
                    "the upstream" if to_upstream else self.peer)
        dst = self._other(src)
        if dst.protocol.state is not State.OPEN:
            return
        if code is None:
            dst.transport.abort()
        elif code == _NO_STATUS:
            self.tee._spawn(dst.close(cast(int, None)))  # a close frame without a code
        else:
            self.tee._spawn(dst.close(code, reason))

    def lost(self, src: _ServerLeg | _ClientLeg) -> None:
        """``src`` is gone; without a close frame from it, drop the other leg too (1006)."""
        if src.protocol.close_rcvd is None:
            self._mirror(src, None, "")

    def close_forks(self) -> None:
        """End every fork; their counts join the tee's once they have ended."""
        taps = list(self.taps.values())
        for tap in taps:
            tap.close()
        if taps:
            self.tee._spawn(self.tee._retire(taps))


class Tee:
    """A transparent WebSocket proxy to ``upstream`` that forks both directions' audio as hops
    ``hop`` and ``hop.return`` (module docstring). ``sink`` is the fork URL for streams whose
    start names none; ``tap_options`` are passed to each :class:`~probe.tap.Tap`. Bad values
    raise ConfigError with one sentence."""

    def __init__(
        self,
        upstream: str,
        *,
        hop: str,
        dialect: Dialect = "probe",
        sink: str | None = None,
        open_timeout: float = OPEN_TIMEOUT_S,
        tap_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.upstream = check_url(upstream, "--upstream")
        try:
            self.hop = check_hop(hop)
            check_hop(hop + RETURN_SUFFIX)
        except ValueError:
            raise ConfigError(
                f"--hop must be 1-57 characters of A-Z a-z 0-9 . _ - (NAME{RETURN_SUFFIX} names "
                f"the return hop), got {hop!r}."
            ) from None
        if dialect not in ("probe", "twilio"):
            raise ConfigError(f"--dialect must be probe or twilio, got {dialect!r}.")
        self.dialect: Dialect = dialect
        self.sink = None if sink is None else check_url(sink, "--sink")
        self.open_timeout = open_timeout
        self.tap_options: dict[str, Any] = dict(tap_options or {})
        self.stats = TeeStats()
        self.url = ""
        self._server: Server | None = None
        self._pending: dict[ServerConnection, ClientConnection] = {}
        self._taps: set[Tap] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; returns the ws:// URL as bound."""
        try:
            self._server = await serve(
                self._handler,
                host,
                port,
                process_request=self._process_request,
                select_subprotocol=self._select_subprotocol,
                process_response=self._process_response,
                server_header=None,
                max_size=None,
                close_timeout=_CLOSE_TIMEOUT_S,
                create_connection=_ServerLeg,
            )
        except OSError as exc:
            why = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"probe tee cannot listen on {host}:{port}: {why}.") from None
        bound = self._server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"ws://{shown}:{bound[1]}/"
        return self.url

    async def stop(self) -> None:
        """Stop listening, close every relayed connection (1001) and end every fork."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _CLOSE_TIMEOUT_S + 1.0)
        for up in list(self._pending.values()):
            await up.close(1001)
        self._pending.clear()
        for tap in list(self._taps):
            tap.close()
        if self._tasks:  # forks ending, their counts joining the tee's
            await asyncio.wait(list(self._tasks), timeout=_CLOSE_TIMEOUT_S + 1.0)

    # -- the handshake --------------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = upstream_url(self.upstream, request.path)
        items = list(request.headers.raw_items())
        offered = [Subprotocol(p) for p in offered_subprotocols(items)]
        peer = _peer(connection)
        try:
            up = await connect(
                url,
                additional_headers=request_headers(items),
                subprotocols=offered or None,
                compression="deflate" if offers_deflate(items) else None,
                user_agent_header=None,
                open_timeout=self.open_timeout,
                close_timeout=_CLOSE_TIMEOUT_S,
                max_size=None,
                proxy=None,
                create_connection=_ClientLeg,
            )
        except InvalidStatus as exc:
            self.stats.upstream_failures += 1
            r = exc.response
            log.warning("tee %s: upstream %s answered the handshake of %s with HTTP %d; "
                        "passed on.", self.hop, url, peer, r.status_code)
            body = bytes(r.body)
            headers = Headers(response_headers(r.headers.raw_items()))
            headers["Date"] = email.utils.formatdate(usegmt=True)
            headers["Connection"] = "close"
            headers["Content-Length"] = str(len(body))
            return Response(r.status_code, r.reason_phrase, headers, body)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self.stats.upstream_failures += 1
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            log.warning("tee %s: upstream %s is unreachable for %s (%s); answered HTTP 502.",
                        self.hop, url, peer, why)
            return connection.respond(
                HTTPStatus.BAD_GATEWAY, f"probe tee: the upstream {url} is unreachable ({why}).\n"
            )
        self._pending[connection] = up
        asyncio.get_running_loop().call_later(_REAP_S, self._reap, connection)
        return None

    def _select_subprotocol(
        self, connection: ServerConnection, subprotocols: Any
    ) -> Subprotocol | None:
        up = self._pending.get(connection)
        return None if up is None else up.subprotocol

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        up = self._pending.get(connection)
        if up is not None and up.response is not None and response.status_code == 101:
            for name, value in response_headers(up.response.headers.raw_items()):
                response.headers[name] = value
        return None

    def _reap(self, connection: ServerConnection) -> None:
        up = self._pending.pop(connection, None)
        if up is not None:  # the client's handshake never completed
            self._spawn(up.close(1001))

    async def _retire(self, taps: list[Tap]) -> None:
        for tap in taps:
            await tap.wait_closed(_CLOSE_TIMEOUT_S)
            self._taps.discard(tap)
            stats = tap.stats
            self.stats.fork_frames += stats.frames_sent
            self.stats.fork_dropped += stats.dropped

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- relaying -------------------------------------------------------------------------------

    async def _handler(self, client: ServerConnection) -> None:
        up = self._pending.pop(client, None)
        if up is None or not isinstance(client, _ServerLeg) or not isinstance(up, _ClientLeg):
            await client.close(1011, "probe tee: no upstream connection")
            return
        self.stats.connections += 1
        peer = _peer(client)
        request = client.request
        handshake = (
            from_headers(dict(request.headers.raw_items()), request.path.partition("?")[2])
            if request is not None
            else from_headers({})
        )
        for note in handshake.notes:
            log.warning("tee %s: %s's handshake: %s.", self.hop, peer, note)
        sniffer = TeeSniffer(
            self.hop, self.dialect, handshake=handshake, sink=self.sink, peer=peer
        )
        relay = _Relay(self, client, up, sniffer, peer)
        relay.attach()
        ends = {asyncio.ensure_future(leg.wait_closed()) for leg in (client, up)}
        try:
            _, rest = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            if rest:  # the other leg was told to close as this one did: its close timeout
                await asyncio.wait(rest, timeout=_CLOSE_TIMEOUT_S + 1.0)
            for leg in (client, up):
                if leg.protocol.state is not State.CLOSED:
                    leg.transport.abort()
        finally:
            for task in ends:
                task.cancel()
            relay.close_forks()


# --- the command ---------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register ``probe tee`` on the CLI's subparsers."""
    t = sub.add_parser(
        "tee", help="a transparent WebSocket proxy that forks the audio it relays to the sink"
    )
    t.add_argument("--listen", default="127.0.0.1:8764", help="HOST:PORT (default 127.0.0.1:8764)")
    t.add_argument("--upstream", required=True,
                   help="ws:// or wss:// URL the clients used to connect to directly")
    t.add_argument("--hop", required=True,
                   help="hop name: NAME forks client->upstream, NAME.return upstream->client")
    t.add_argument("--dialect", choices=("probe", "twilio"), default="probe")
    t.add_argument("--sink", default=None,
                   help="sink URL for streams whose start names none")


def command(args: argparse.Namespace) -> int:
    """Run ``probe tee`` until interrupted (SIGINT or SIGTERM)."""
    from probe.aio.loop import run

    host, port = parse_host_port(args.listen, "--listen")
    tee = Tee(args.upstream, hop=args.hop, dialect=args.dialect, sink=args.sink)

    async def go() -> None:
        url = await tee.start(host, port)
        print(f"probe tee: {url} -> {tee.upstream}, forking hops {tee.hop} and "
              f"{tee.hop}{RETURN_SUFFIX} to {tee.sink or 'the sink each start names'}",
              file=sys.stderr, flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, done.set)
        started = time.monotonic()
        try:
            await done.wait()
        finally:
            await tee.stop()
            s = tee.stats
            print(f"probe tee: stopped after {time.monotonic() - started:.0f} s; "
                  f"{s.connections} connections, {s.to_upstream} messages up, {s.to_client} "
                  f"down, {s.forks_opened} forks ({s.fork_frames} frames sent, "
                  f"{s.fork_dropped} dropped), {s.upstream_failures} upstream failures",
                  file=sys.stderr, flush=True)

    run(go())
    return 0
