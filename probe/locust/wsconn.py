"""A lean WebSocket client for gevent: websockets' sans-I/O ``ClientProtocol`` over one socket.

The ``websockets`` sync client, under monkey patching, runs a reading "thread" (a greenlet) per
connection that waits through a selector emulation (two watchers started and stopped per read, a
socket pair per connection to wake it), hands each message to an assembler under a lock and a
condition, and the application reads it from there in another greenlet. A load generator pays all
of that per 20 ms frame. This client keeps websockets for everything the protocol is (handshake,
framing, masking, control frames, close codes: :class:`websockets.client.ClientProtocol`) and does
only the I/O, the way websockets documents for custom integrations:

- :func:`open_client` connects, does the opening handshake, raises what the sync client raises
  (``OSError``, ``TimeoutError``, :class:`~websockets.exceptions.InvalidHandshake` and its
  :class:`~websockets.exceptions.InvalidStatus`);
- :meth:`GeventClient.send` frames and writes a message from the calling greenlet;
- :meth:`GeventClient.receive` reads in the calling greenlet (the session's receiving one) and
  hands every message to a callback with the time its bytes were read off the socket, until the
  connection closes; no queue, no lock, no further greenlet;
- a message split into fragments is joined; a text message that is not UTF-8 fails the connection
  with 1007, as RFC 6455 says;
- :meth:`GeventClient.close` does the closing handshake with a timeout, then closes the socket.

Send and receive raise :class:`~websockets.exceptions.ConnectionClosed` once the connection is
closed, with the close frames exchanged, like the sync client.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event
from gevent.lock import Semaphore
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import USER_AGENT, Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["GeventClient", "open_client"]

_READ_SIZE = 1 << 16

OnMessage = Callable[[bytes | str, float], None]


class GeventClient:
    """An open client connection; see the module's docstring."""

    def __init__(
        self,
        sock: Any,
        protocol: ClientProtocol,
        clock: Callable[[], float],
        *,
        close_timeout: float,
        early: list[Frame],
        early_at: float,
    ) -> None:
        self.sock = sock
        self.protocol = protocol
        self.clock = clock
        self.close_timeout = close_timeout
        self._write_lock = Semaphore()
        self._early = early  # frames that came with the handshake response
        self._early_at = early_at
        self._parts: list[bytes] = []
        self._text = False
        self._receiving = False
        self._eof = False
        self._ended = Event()  # set once the end of the stream was read
        self._socket_closed = False

    # -- sending --------------------------------------------------------------------------------

    def send(self, message: bytes | str) -> None:
        """Send one message: ``str`` as a text frame, ``bytes`` as a binary frame."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            raise self._closed_exc()
        if isinstance(message, str):
            protocol.send_text(message.encode())
        else:
            protocol.send_binary(message)
        self._flush()

    def _flush(self) -> None:
        """Write what the protocol has to send (frames, close replies, pongs; EOF half-closes)."""
        chunks = self.protocol.data_to_send()
        if not chunks:
            return
        with self._write_lock:
            for chunk in chunks:
                if chunk:
                    self.sock.sendall(chunk)
                else:
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_WR)

    def _closed_exc(self) -> ConnectionClosed:
        protocol = self.protocol
        if protocol.state is not State.CLOSED:
            # Closing and not yet closed (a close frame sent, no reply yet): what the sync client
            # raises then too, without the codes.
            return ConnectionClosed(protocol.close_rcvd, protocol.close_sent)
        return protocol.close_exc

    # -- receiving ------------------------------------------------------------------------------

    def receive(self, on_message: OnMessage) -> ConnectionClosed:
        """Read until the connection closes, calling ``on_message(message, arrival)`` for each
        message in order; return how it closed. Run it in one greenlet only."""
        self._receiving = True
        try:
            if self._early:
                early, self._early = self._early, []
                for frame in early:
                    self._frame(frame, self._early_at, on_message)
            while not self._eof:
                if self.protocol.close_expected():
                    # A close frame went or came: the peer ends the TCP connection soon, or is
                    # made to.
                    with gevent.Timeout(self.close_timeout, False):
                        while not self._eof:
                            self._read_once(on_message)
                    break
                self._read_once(on_message)
        finally:
            self._receiving = False
        if not self._eof:
            self.abort()
        return self._closed_exc()

    def _read_once(self, on_message: OnMessage | None) -> None:
        protocol = self.protocol
        try:
            data = self.sock.recv(_READ_SIZE)
        except OSError:
            data = b""
        at = self.clock()
        if not data:
            self._eof = True
            self._ended.set()
            protocol.receive_eof()
            self._flush_quietly()
            return
        protocol.receive_data(data)
        events = protocol.events_received()
        self._flush_quietly()
        for event in events:
            if isinstance(event, Frame):
                self._frame(event, at, on_message)

    def _flush_quietly(self) -> None:
        with contextlib.suppress(OSError):
            self._flush()

    def _frame(self, frame: Frame, at: float, on_message: OnMessage | None) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._deliver(frame.data, opcode is Opcode.TEXT, at, on_message)
            else:
                self._parts = [bytes(frame.data)]
                self._text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            self._parts.append(bytes(frame.data))
            if frame.fin:
                data, self._parts = b"".join(self._parts), []
                self._deliver(data, self._text, at, on_message)

    def _deliver(
        self, data: bytes | bytearray | memoryview, text: bool, at: float,
        on_message: OnMessage | None,
    ) -> None:
        if on_message is None:  # closing: nobody reads any more
            return
        if not text:
            on_message(bytes(data), at)
            return
        try:
            decoded = bytes(data).decode()
        except UnicodeDecodeError:
            if self.protocol.state is State.OPEN:
                self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                self._flush_quietly()
            return
        on_message(decoded, at)

    # -- closing --------------------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Closing handshake (when still open), waiting at most ``close_timeout`` for the peer to
        end the TCP connection, then close the socket. Idempotent, never raises."""
        if self._socket_closed:
            return
        try:
            if self.protocol.state is State.OPEN:
                self.protocol.send_close(code, reason)
                self._flush()
            if self._receiving:
                # The receiving greenlet reads the reply and the end of the connection.
                self._ended.wait(self.close_timeout)
            else:
                # Nobody reads: read (and drop) until the peer ends the connection.
                with gevent.Timeout(self.close_timeout, False):
                    while not self._eof:
                        self._read_once(None)
        except OSError:
            pass
        self.abort()

    def abort(self) -> None:
        """Close the socket now (the receiving greenlet then sees the end)."""
        if self._socket_closed:
            return
        self._socket_closed = True
        if not self._eof and self.protocol.state is not State.CLOSED:
            self.protocol.receive_eof()
        with contextlib.suppress(OSError):
            self.sock.close()


def _wrap_tls(sock: Any, context: ssl.SSLContext | None, host: str) -> Any:
    """A gevent TLS socket over ``sock`` (cooperative whether or not ``ssl`` is monkey-patched;
    the handshake happens here)."""
    if context is None:
        context = gssl.create_default_context()
    if isinstance(context, gssl.SSLContext):
        return context.wrap_socket(sock, server_hostname=host)
    # A context made before monkey patching (or without it): gevent's socket class takes it.
    return gssl.SSLSocket(sock=sock, server_hostname=host, _context=context)


def open_client(
    url: str,
    *,
    clock: Callable[[], float],
    open_timeout: float,
    max_size: int | None = 2**22,
    close_timeout: float = 2.0,
    ssl_context: ssl.SSLContext | None = None,
) -> GeventClient:
    """Connect to ``url`` (ws:// or wss://) and do the opening handshake within
    ``open_timeout`` seconds. Raises ``OSError``, ``TimeoutError`` or ``InvalidHandshake``."""
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_size)
    sock: Any = None
    try:
        with gevent.Timeout(open_timeout, TimeoutError("timed out during the opening handshake")):
            sock = gsocket.create_connection((uri.host, uri.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            if uri.secure:
                sock = _wrap_tls(sock, ssl_context, uri.host)
            request = protocol.connect()
            request.headers.setdefault("User-Agent", USER_AGENT)
            protocol.send_request(request)
            for chunk in protocol.data_to_send():
                sock.sendall(chunk)
            events: list[Any] = []
            at = clock()
            while not events:
                data = sock.recv(_READ_SIZE)
                at = clock()
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                events = protocol.events_received()
                if not data:
                    break
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    if protocol.handshake_exc is not None or not events or not isinstance(events[0], Response):
        sock.close()
        exc = protocol.handshake_exc
        if isinstance(exc, InvalidHandshake):
            raise exc
        raise InvalidHandshake("the connection closed during the opening handshake")
    early = [e for e in events[1:] if isinstance(e, Frame)]
    return GeventClient(
        sock, protocol, clock, close_timeout=close_timeout, early=early, early_at=at,
    )
