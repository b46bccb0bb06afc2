"""The sink of one Locust worker: ``websockets.sync`` served from a greenlet.

The same job as :class:`probe.sink.Sink` (PROTOCOL.md section 2) with gevent's I/O: under Locust's
monkey patching the sync server's accept loop and its per-connection "threads" are greenlets, so
forks are read cooperatively beside the paced sources. Each frame is stamped with its arrival time
the moment it is received and its detection goes to the native detection thread; the protocol
receiver judges the frames and the registry (on the hub) does the bookkeeping.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import gevent
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from probe.errors import ConfigError
from probe.hopstream import HopStream
from probe.locust.detect import DetectionOutbox, NativeDetectionWorker
from probe.measure.registry import SessionRegistry
from probe.protocol import Audio, ForkReceiver, ForkStart, ProtocolViolation, Started, Stopped

log = logging.getLogger(__name__)

FORK_IDLE_S = 30.0


class GeventSink:
    """Accepts fork connections in greenlets; detections reach ``registry`` on the hub."""

    def __init__(
        self,
        registry: SessionRegistry,
        worker: NativeDetectionWorker,
        outbox: DetectionOutbox,
        *,
        clock: Callable[[], float],
        idle_timeout: float = FORK_IDLE_S,
    ) -> None:
        self.registry = registry
        self.worker = worker
        self.outbox = outbox
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.url = ""
        self.connections = 0
        self._server: Server | None = None
        self._greenlet: Any = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; return the ws:// URL as bound. A port that is taken is a ConfigError."""
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                why = "the port is already in use"
            raise ConfigError(f"The probe sink cannot listen on {host}:{port}: {why}.") from exc
        self._server = serve(
            self._handle,
            sock=sock,
            compression=None,
            max_size=2**22,
            ping_interval=None,
            close_timeout=2,
        )
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"ws://{shown}:{bound_port}/sink"
        self._greenlet = gevent.spawn(self._server.serve_forever)
        return self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0]) if self.url else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._greenlet is not None:
            self._greenlet.join(timeout=5)
            self._greenlet = None

    def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        receiver = ForkReceiver()
        stream: HopStream | None = None
        hop = "unknown"
        session: str | None = None
        try:
            while True:
                try:
                    frame = ws.recv(timeout=self.idle_timeout)
                except TimeoutError:
                    self.registry.hop_error(
                        hop, session, f"fork sent nothing for {self.idle_timeout:.0f} s (stalled)"
                    )
                    ws.close(1008, "idle fork")
                    break
                arrival = self.clock()
                events = (
                    receiver.receive_binary(frame)
                    if isinstance(frame, bytes)
                    else receiver.receive_text(frame)
                )
                for ev in events:
                    if isinstance(ev, Started) and isinstance(ev.msg, ForkStart):
                        msg = ev.msg
                        if stream is None:
                            hop, session = msg.hop, msg.session
                            self.registry.hop_connected(hop, session, msg.traceparent)
                            stream = self.outbox.stream(hop, msg.audio, session_hint=session)
                        else:
                            self.worker.submit(stream.set_format, msg.audio)
                    elif isinstance(ev, Audio) and stream is not None:
                        self.worker.submit(stream.on_audio, ev.data, arrival)
                    elif isinstance(ev, Stopped):
                        break
                if receiver.stopped:
                    break
        except ProtocolViolation as exc:
            self.registry.hop_error(hop, session, f"fork broke the protocol: {exc.reason}")
            ws.close(exc.close_code, exc.reason)
        except ConnectionClosed as exc:
            if stream is None or not receiver.stopped:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                if code not in (1000, 1001):
                    self.registry.hop_error(
                        hop, session, f"fork connection closed without stop (code {code})"
                    )
        finally:
            if stream is not None:
                self.worker.submit(stream.close)
