"""The sink child process of :mod:`probe.aio.sinkproc` beside a gevent hub, with no OS thread.

A Locust worker hands its fork sink and every marker detection (forks and the return direction)
to ``python -m probe.aio.sinkproc``, the same child ``probe run`` uses, so the worker process is
left with the paced sessions only: a detection thread in the worker would hold the interpreter in
bursts, and every socket call of the hub would then wait for it (a convoy measured as send lag).

Only the I/O differs from :class:`probe.aio.sinkproc.SinkProcess`: here the socket pair is a
gevent-cooperative socket served by two greenlets, so nothing blocks the hub and no thread
competes with it for the interpreter:

- messages for the child (return-direction audio, stream open/format/close, drain, stop) are
  appended to a list and written as one batch by a flusher greenlet every ``flush_interval_s``
  (framed as :class:`multiprocessing.connection.Connection` frames them, so the child is
  unchanged);
- a reader greenlet decodes the child's messages (:class:`probe.measure.sinkwire.Reader`) and
  applies them to the registry right there, on the hub, like everything else that touches the
  registry, its observers and Locust's events.

Clock: the child stamps fork arrivals with ``time.time``; the engine's sessions stamp sends with
the same wall clock (PROTOCOL.md section 4).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from probe.aio.sinkproc import _START_TIMEOUT_S, SinkChild, spawn_child, start_error
from probe.measure import sinkwire as wire
from probe.measure.admission import MAX_FORKS
from probe.measure.registry import SessionRegistry

log = logging.getLogger(__name__)

__all__ = ["GeventSinkProcess"]

_READ_SIZE = 1 << 16


class GeventSinkProcess(SinkChild):
    """A fork sink and all detection in a child process; this side runs on the gevent hub."""

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        idle_timeout: float = 30.0,
        flush_interval_s: float = 0.01,
        detect_nice: int = 0,
        capability: str | None = None,
        tls: tuple[str, str] | None = None,
        max_forks: int = MAX_FORKS,
    ) -> None:
        super().__init__(
            registry, idle_timeout=idle_timeout, capability=capability, tls=tls,
            max_forks=max_forks,
        )
        self.flush_interval_s = flush_interval_s
        self.detect_nice = detect_nice
        self.proc: Any = None
        self._sock: Any = None
        self._outbox: list[wire.Message] = []
        self._wake = Event()
        self._drained_event = Event()
        self._stopping = False
        self._stopped = False
        self._drained = -1
        self._drain_seq = 0
        self._flusher: Any = None
        self._reader: Any = None
        self.batches_sent = 0
        self.messages_sent = 0

    def _send(self, msg: wire.Message) -> None:
        """Queue a message for the next batch; never blocks, never switches greenlets."""
        if self._sock is not None and not self._stopping:
            self._outbox.append(msg)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the child (cooperatively); return its sink's ws:// URL ("" when ``port`` < 0:
        detection streams only). ConfigError with one sentence when the sink cannot listen."""
        mine, proc = spawn_child(
            host, port, self.idle_timeout, detect_nice=self.detect_nice,
            capability=self.capability, tls=self.tls, max_forks=self.max_forks,
        )
        # Cooperative whether or not the socket module is monkey-patched.
        sock = gsocket.socket(fileno=mine.detach())
        reader = wire.Reader()
        msgs: list[wire.Message] = []
        with gevent.Timeout(_START_TIMEOUT_S, False):
            while not msgs:
                data = sock.recv(_READ_SIZE)
                if not data:
                    break
                msgs = reader.feed(data)
        first = msgs[0] if msgs else None
        if not isinstance(first, wire.Ready):
            proc.kill()
            _wait_exit(proc, 5.0)
            sock.close()
            raise start_error(first)
        self.url = first.url
        self.proc, self._sock = proc, sock
        for msg in msgs[1:]:
            self._apply(msg)
        self._reader = gevent.spawn(self._read_loop, reader)
        self._flusher = gevent.spawn(self._flush_loop)
        return self.url

    def _flush_loop(self) -> None:
        sock = self._sock
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if not self._outbox:
                continue
            batch, self._outbox = self._outbox, []
            try:
                sock.sendall(wire.encode(wire.Batch(tuple(wire.to_wire(m) for m in batch))))
            except OSError as exc:
                log.warning("the sink process is gone: %s", exc)
                self._stopping = True
                return
            self._written(batch)
            self.batches_sent += 1
            self.messages_sent += len(batch)
            if isinstance(batch[-1], wire.Stop):  # nothing is queued after it
                return

    def _read_loop(self, reader: wire.Reader) -> None:
        sock = self._sock
        try:
            while True:
                data = sock.recv(_READ_SIZE)
                if not data:
                    if not self._stopping:
                        _wait_exit(self.proc, 2.0)
                        self._lost(self.proc, self.proc.poll())
                    return
                for msg in reader.feed(data):
                    self._apply(msg)
                    if isinstance(msg, wire.Drained):
                        self._drained = max(self._drained, msg.seq)
                        self._drained_event.set()
                    elif isinstance(msg, wire.Stopped):
                        return
        except (OSError, ValueError) as exc:
            log.warning("the sink process is gone: %s", exc)
        finally:
            self._stopped = True
            self._drained_event.set()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait (cooperatively) until the child has detected everything sent or received so
        far and its detections are in the registry; False on timeout."""
        if self._sock is None or self._stopped or self._stopping:
            return True
        self._drain_seq += 1
        seq = self._drain_seq
        self._send(wire.Drain(seq))
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._drained < seq and not self._stopped:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # Woken by the reader at each Drained (or when the child is gone).
            self._drained_event.clear()
            if self._drained >= seq or self._stopped:
                break
            self._drained_event.wait(left)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the sink, apply its last detections, end the child."""
        if self._sock is None:
            return
        self._stop_expected()
        self._send(wire.Stop())
        self._stopping = True
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
            if not self._reader.dead:
                self._reader.kill(block=False)
        if self.proc is not None and not _wait_exit(self.proc, 10.0):
            self.proc.kill()
            _wait_exit(self.proc, 5.0)
        self._sock.close()
        self._sock = None


def _wait_exit(proc: Any, timeout: float) -> bool:
    """Wait for ``proc`` without blocking the hub (its ``wait`` may be the unpatched one)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        gevent.sleep(0.02)
    return True
