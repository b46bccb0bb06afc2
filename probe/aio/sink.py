"""The sink: a WebSocket server that hops fork their output to (PROTOCOL.md section 2).

A thin asyncio shell: it stamps each frame with its arrival time the moment it is received and
hands it to the detection worker; the protocol receiver judges the frames, the registry does the
bookkeeping. A fork that breaks the protocol is closed with the violation's code and reason and
noted as a hop error; the run goes on.

Per frame the loop does as little as it can, since a sink receives one frame per hop for every
frame the source sends:

- frames are handed to the detection worker in batches, every ``batch_s`` (one queue hand-over
  and one wake-up of the worker thread for all the frames of all forks received meanwhile, not
  one per frame); the arrival stamp is taken at receipt, so batching delays detection, never
  the time measured; :meth:`Sink.flush` hands over what is waiting at once;
- a fork that sends nothing for ``idle_timeout`` is found by one watchdog task for the whole
  sink, not by a timeout around every receive (``asyncio.wait_for`` makes a task per call);
- once a fork has started and its handler has caught up, its binary frames are taken straight
  from the protocol callback (:class:`_ForkConnection`), stamped and batched there, without
  waking the handler task for each through ``recv()``; any other frame (a text message, a
  fragment) ends that until the handler, in order, has read it and caught up again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from probe.aio.hopstream import DetectionWorker, HopStream
from probe.aio.wsstamp import StampedServerConnection
from probe.errors import ConfigError
from probe.measure.admission import MAX_FORKS, TOO_MANY_FORKS, Admission, with_capability
from probe.measure.expect import ExpectationBook
from probe.measure.sinkwire import RegistryEvents
from probe.protocol import Audio, ForkReceiver, ForkStart, ProtocolViolation, Started, Stopped

log = logging.getLogger(__name__)

# A fork that sends nothing for this long is treated as stalled and closed.
FORK_IDLE_S = 30.0
# Frames received within this long reach the detection worker in one hand-over.
BATCH_S = 0.01
# A session's fork silent this long is reported to the registry (which names the hop stalled
# when markers sent meanwhile are missed; a hop that only forks speech may pause legitimately).
SILENT_S = 1.0


class _ForkConnection(StampedServerConnection):
    """A stamped server connection whose whole binary messages go to ``direct`` (with their
    arrival) while it is set, instead of through ``recv()``. Any other event unsets it first
    and takes the usual way, so the handler reads it, and whatever follows it, in order."""

    direct: Callable[[bytes, float], None] | None = None

    def process_event(self, event: Any) -> None:
        direct = self.direct
        if direct is not None:
            if type(event) is Frame and event.opcode is Opcode.BINARY and event.fin:
                data = event.data
                direct(data if type(data) is bytes else bytes(data), self.clock())
                return
            self.direct = None
        super().process_event(event)

    def caught_up(self) -> bool:
        """Whether no received message waits for ``recv()`` (False when that is unknown)."""
        queued = getattr(self, "recv_messages", None)
        frames = getattr(queued, "frames", None)
        try:
            return frames is not None and len(frames) == 0
        except TypeError:
            return False


@lru_cache(maxsize=8)
def _fork_factory(clock: Callable[[], float]) -> type[_ForkConnection]:
    """``create_connection`` for ``serve``: fork connections stamped with ``clock``."""
    return type("ForkConnection", (_ForkConnection,), {"clock": staticmethod(clock)})


class _Fork:
    """What the idle watchdog knows of one fork connection."""

    __slots__ = ("hop", "last", "session", "silent", "ws")

    def __init__(self, ws: ServerConnection, last: float) -> None:
        self.ws = ws
        self.hop = "unknown"
        self.session: str | None = None
        self.last = last
        self.silent = False  # reported silent, not yet heard again


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
        batch_s: float = BATCH_S,
        admission: Admission | None = None,
        tls: ssl.SSLContext | None = None,
        max_forks: int = MAX_FORKS,
    ) -> None:
        """``book`` (touched only on the worker's thread) makes forks of known sessions use
        informed detection; ``admission`` refuses forks without the run's capability (the URL
        :meth:`start` returns carries it); a fork beyond ``max_forks`` at once is refused with
        1013 (try again later) and counted like a refused capability."""
        self.registry = registry
        self.book = book
        self.worker = worker
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.batch_s = batch_s
        self.admission = admission or Admission(None)
        self.tls = tls  # a wss:// sink with this context
        self.max_forks = max_forks
        self._server: Server | None = None
        self.url = ""
        self.connections = 0
        self._forks: set[_Fork] = set()
        self._watchdog: asyncio.Task[None] | None = None
        # (function, arguments, whether it is audio the worker may shed)
        self._batch: list[tuple[Callable[..., None], tuple[object, ...], bool]] = []
        self._flush_at: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; return the ws:// URL of the sink as bound."""
        try:
            self._server = await serve(
                self._handle,
                host,
                port,
                max_size=2**22,
                create_connection=_fork_factory(self.clock),
                ssl=self.tls,
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                why = "the port is already in use"
            raise ConfigError(f"The probe sink cannot listen on {host}:{port}: {why}.") from exc
        sock = next(iter(self._server.sockets))
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "wss" if self.tls is not None else "ws"
        self.url = f"{scheme}://{shown}:{bound_port}/sink"
        if self.admission.capability is not None:
            self.url = with_capability(self.url, self.admission.capability)
        self._watchdog = asyncio.create_task(self._watch_idle())
        return self.url

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.flush()

    def flush(self) -> None:
        """Hand the frames waiting for their batch to the detection worker now (loop thread)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._batch:
            batch, self._batch = self._batch, []
            self.worker.submit(self._run_batch, batch)

    def _submit(self, fn: Callable[..., None], *args: object, audio: bool = False) -> None:
        self._batch.append((fn, args, audio))
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(self.batch_s, self.flush)

    def _run_batch(self, batch: list[tuple[Callable[..., None], tuple[object, ...], bool]]) -> None:
        """Run a batch of detection work in order (on the worker's thread), shedding its audio
        when it waited too long; one failure does not drop the rest."""
        stale = self.worker.stale()
        for fn, args, audio in batch:
            if audio and stale:
                self.worker.shed += 1
                continue
            try:
                fn(*args)
            except Exception as exc:
                log.error("detection failed: %s", exc, exc_info=exc)

    async def _watch_idle(self) -> None:
        """Close forks that sent nothing for ``idle_timeout``, as stalled hops; report a
        session's fork silent for ``SILENT_S`` (once per silence)."""
        while True:
            await asyncio.sleep(min(0.5, self.idle_timeout / 4))
            now = self.clock()
            for f in self._forks:
                if not f.silent and f.session is not None and now - f.last >= SILENT_S:
                    f.silent = True
                    self.registry.hop_silent(f.hop, f.session, f.last)
            for fork in [f for f in self._forks if now - f.last >= self.idle_timeout]:
                self._forks.discard(fork)
                self.registry.hop_error(
                    fork.hop,
                    fork.session,
                    f"fork sent nothing for {self.idle_timeout:.0f} s (stalled)",
                )
                # The handler sees the close as the end of its connection; it does not report
                # it again.
                task = asyncio.create_task(fork.ws.close(1008, "idle fork"))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        refused = self.admission.refuse(ws.request.path if ws.request is not None else "")
        if refused is not None:
            # Counted once per reason in the report, never as a hop or a hop error.
            self.registry.fork_rejected(refused)
            await ws.close(1008, f"fork refused: {refused}")
            return
        if len(self._forks) >= self.max_forks:
            self.registry.fork_rejected(TOO_MANY_FORKS)
            await ws.close(1013, f"fork refused: {TOO_MANY_FORKS}")
            return
        receiver = ForkReceiver()
        stream: HopStream | None = None
        fork = _Fork(ws, self.clock())
        self._forks.add(fork)
        stamped = isinstance(ws, StampedServerConnection)
        direct_ws = ws if isinstance(ws, _ForkConnection) else None

        def direct(data: bytes, arrival: float) -> None:
            # A binary message of a started fork, from the protocol callback (in order: the
            # handler had read everything before it). Only a text message changes the
            # receiver's state (and it ends this first), so this is its audio as such.
            fork.last = arrival
            if fork.silent:
                fork.silent = False
                if fork.session is not None:
                    self.registry.hop_silent(fork.hop, fork.session, None)
            if data and stream is not None:
                self._submit(stream.on_audio, data, arrival, audio=True)

        try:
            while True:
                frame = await ws.recv()
                arrival = ws.arrival() if stamped else self.clock()  # type: ignore[attr-defined]
                fork.last = arrival
                if fork.silent:
                    fork.silent = False
                    if fork.session is not None:
                        self.registry.hop_silent(fork.hop, fork.session, None)
                events = (
                    receiver.receive_binary(frame)
                    if isinstance(frame, bytes)
                    else receiver.receive_text(frame)
                )
                for ev in events:
                    if isinstance(ev, Audio) and stream is not None:
                        self._submit(stream.on_audio, ev.data, arrival, audio=True)
                    elif isinstance(ev, Started) and isinstance(ev.msg, ForkStart):
                        msg = ev.msg
                        if stream is None:
                            fork.hop, fork.session = msg.hop, msg.session
                            self.registry.hop_connected(msg.hop, msg.session, msg.traceparent)
                            stream = HopStream(
                                self.registry, msg.hop, msg.audio, session_hint=msg.session,
                                book=self.book,
                            )
                        else:
                            self._submit(stream.set_format, msg.audio)
                    elif isinstance(ev, Stopped):
                        break
                if receiver.stopped:
                    break
                # Started (a stream), not stopped (see above), not failed (it would have raised).
                if direct_ws is not None and stream is not None and direct_ws.caught_up():
                    direct_ws.direct = direct
        except ProtocolViolation as exc:
            self.registry.hop_error(
                fork.hop, fork.session, f"fork broke the protocol: {exc.reason}"
            )
            await ws.close(exc.close_code, exc.reason)
        except ConnectionClosed as exc:
            # A fork the watchdog closed as idle is reported already.
            if fork in self._forks and (stream is None or not receiver.stopped):
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                if code not in (1000, 1001):
                    self.registry.hop_error(
                        fork.hop,
                        fork.session,
                        f"fork connection closed without stop (code {code})",
                    )
        finally:
            if direct_ws is not None:
                direct_ws.direct = None
            self._forks.discard(fork)
            if stream is not None:
                self._submit(stream.close)


