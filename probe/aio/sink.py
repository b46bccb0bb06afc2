"""The sink: a WebSocket server that hops fork their output to (PROTOCOL.md section 2).

A thin asyncio shell: it stamps each frame with its arrival time the moment it is received and
hands it to the detection worker; the protocol receiver judges the frames, the registry does the
bookkeeping. A fork that breaks the protocol is closed with the violation's code and reason and
noted as a hop error; the run goes on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from probe.aio.hopstream import DetectionWorker, HopStream
from probe.aio.wsstamp import StampedServerConnection, server_factory
from probe.errors import ConfigError
from probe.measure.expect import ExpectationBook
from probe.measure.sinkwire import RegistryEvents
from probe.protocol import Audio, ForkReceiver, ForkStart, ProtocolViolation, Started, Stopped

log = logging.getLogger(__name__)

# A fork that sends nothing for this long is treated as stalled and closed.
FORK_IDLE_S = 30.0


class Sink:
    """Accepts fork connections and turns their audio into detections in ``registry``."""

    def __init__(
        self,
        registry: RegistryEvents,
        worker: DetectionWorker,
        *,
        clock: Callable[[], float],
        idle_timeout: float = FORK_IDLE_S,
        book: ExpectationBook | None = None,
    ) -> None:
        """``book`` (touched only on the worker's thread) makes forks of known sessions use
        informed detection."""
        self.registry = registry
        self.book = book
        self.worker = worker
        self.clock = clock
        self.idle_timeout = idle_timeout
        self._server: Server | None = None
        self.url = ""
        self.connections = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; return the ws:// URL of the sink as bound."""
        try:
            self._server = await serve(
                self._handle,
                host,
                port,
                max_size=2**22,
                create_connection=server_factory(self.clock),
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                why = "the port is already in use"
            raise ConfigError(f"The probe sink cannot listen on {host}:{port}: {why}.") from exc
        sock = next(iter(self._server.sockets))
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"ws://{shown}:{bound_port}/sink"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        receiver = ForkReceiver()
        stream: HopStream | None = None
        hop = "unknown"
        session: str | None = None
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(ws.recv(), timeout=self.idle_timeout)
                except TimeoutError:
                    self.registry.hop_error(
                        hop, session, f"fork sent nothing for {self.idle_timeout:.0f} s (stalled)"
                    )
                    await ws.close(1008, "idle fork")
                    break
                arrival = ws.arrival() if isinstance(ws, StampedServerConnection) else self.clock()
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
                            stream = HopStream(
                                self.registry, hop, msg.audio, session_hint=session,
                                book=self.book,
                            )
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
            await ws.close(exc.close_code, exc.reason)
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
