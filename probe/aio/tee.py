"""``probe tee``: a transparent WebSocket proxy that forks the audio it relays to the probe's sink.

Put it between two components nobody can change (``--listen`` where the client connects,
``--upstream`` where it used to connect) and that link becomes two measured hops: ``NAME`` (what
the client sends, as it leaves the tee) and ``NAME.return`` (what comes back). What is passed on
and what is forked is decided by :mod:`probe.tee`; this shell connects, relays and writes to
:class:`probe.tap.Tap` forks.

- The upstream is connected during the client's handshake, so its answer is the client's: the
  subprotocol it picks, its response headers, and an HTTP refusal (status, headers and body) are
  passed back; an upstream that cannot be reached is answered with HTTP 502 and a log line.
- Every message is relayed as it arrives, text as text and binary as binary, in order, before
  anything is forked (a fork only ever reads what was already sent on).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.http11 import Request, Response
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


class _Connection:
    """One relayed connection: its sniffer and forks."""

    def __init__(self, tee: Tee, sniffer: TeeSniffer, peer: str) -> None:
        self.tee = tee
        self.sniffer = sniffer
        self.peer = peer
        self.taps: dict[str, Tap] = {}
        self.broken = False
        self.closed_by: str | None = None

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

    def sniff(self, fn: Callable[[str | bytes], list[TeeEvent]], message: str | bytes) -> None:
        if self.broken:
            return
        try:
            self.apply(fn(message))
        except Exception as exc:  # forking must never cost the relay
            self.broken = True
            log.error("tee %s: forking %s's stream failed; relaying without forks (%r)",
                      self.tee.hop, self.peer, exc)

    def close(self) -> None:
        for tap in self.taps.values():
            tap.close()


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
        for tap in list(self._taps):
            await tap.wait_closed(2.0)

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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- relaying -------------------------------------------------------------------------------

    async def _handler(self, client: ServerConnection) -> None:
        up = self._pending.pop(client, None)
        if up is None:
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
        conn = _Connection(self, sniffer, peer)
        upward = asyncio.create_task(self._pump(client, up, conn, "client"))
        try:
            await self._pump(up, client, conn, "upstream")
            await upward
        finally:
            upward.cancel()
            conn.close()

    async def _pump(
        self,
        src: ServerConnection | ClientConnection,
        dst: ServerConnection | ClientConnection,
        conn: _Connection,
        who: str,
    ) -> None:
        stats = self.stats
        sniff = conn.sniffer.client if who == "client" else conn.sniffer.upstream
        to_upstream = who == "client"
        try:
            async for message in src:
                try:
                    await dst.send(message)
                except ConnectionClosed:
                    return  # the other side closed; its pump passes its close on
                if to_upstream:
                    stats.to_upstream += 1
                else:
                    stats.to_client += 1
                conn.sniff(sniff, message)
        except ConnectionClosed:
            pass
        rcvd = src.protocol.close_rcvd
        if conn.closed_by is None:
            conn.closed_by = who
            code = None if rcvd is None else rcvd.code
            other = "the upstream" if to_upstream else conn.peer
            level = logging.INFO if code in (1000, 1001) else logging.WARNING
            log.log(level, "tee %s: %s closed %s; closing %s the same way.", self.hop,
                    conn.peer if to_upstream else "the upstream", _close_words(
                        code, None if rcvd is None else rcvd.reason), other)
        if rcvd is None:
            dst.transport.abort()
        elif rcvd.code == _NO_STATUS:
            await dst.close(cast(int, None))  # a close frame without a code, as received
        else:
            await dst.close(rcvd.code, rcvd.reason)


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
                  f"down, {s.forks_opened} forks, {s.upstream_failures} upstream failures",
                  file=sys.stderr, flush=True)

    run(go())
    return 0
