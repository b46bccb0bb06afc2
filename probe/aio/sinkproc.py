"""The sink in a child process, so fork traffic and detection never share a GIL with the pacing.

With many sessions the sink receives several frames for every frame the source sends (one per
hop) and runs the detector on all of them. In the same process that work competes with the
pacing loop for the interpreter: frames are handed to the socket late (send lag). Here the
:class:`~probe.aio.sink.Sink` and its :class:`~probe.aio.hopstream.DetectionWorker` run in a child
process with their own event loop, and so does detection of the return direction's audio, which the
source hands over frame by frame (:meth:`SinkProcess.open_stream`). What the registry needs (hop
connected, hop error, detection) comes back over a socket pair as typed messages
(:mod:`probe.measure.sinkwire`) and is applied to the parent's registry by one reader thread. The
parent process is left with no CPU-heavy thread: a thread that holds the interpreter makes every
socket send of the pacing loop wait for it (measured with a detection thread in the parent: 85 us
per send and p99 send lag 160 ms at 30 sessions).

Clock: the child stamps arrivals with ``time.time``, the wall clock the parent's source uses for
send times, on the same host (PROTOCOL.md section 4). A run with any other injected clock uses
the in-process sink instead (see :mod:`probe.aio.runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from probe.cpushare import CpuShare
from probe.errors import ConfigError
from probe.measure import sinkwire as wire
from probe.measure.admission import MAX_FORKS, Admission
from probe.measure.registry import SessionRegistry
from probe.protocol import AudioFormat, TraceContext
from probe.tls import server_context

log = logging.getLogger(__name__)

__all__ = [
    "RemoteStream",
    "SinkChild",
    "SinkProcess",
    "spawn_child",
    "start_error",
]

_START_TIMEOUT_S = 30.0
# What the parent queues for the child within this long goes in one batch.
_FLUSH_S = 0.01
# The child reports its detection backlog this often, and its CPU share every _CPU_TICKS reports.
_HEALTH_S = 0.25
_CPU_TICKS = 4
# Return-direction audio the parent holds for the child at most (bytes): about 2 s of 250
# sessions' 16 kHz pcm16. The child normally reads within one flush interval (10 ms); only a child
# that has stopped keeping up lets this much pile up.
MAX_QUEUED_AUDIO_BYTES = 16 << 20
_AUDIO_TAG = wire.StreamAudio.TAG
CAPABILITY_ENV = "PROBE_SINK_CAPABILITY"
TLS_CERT_ENV = "PROBE_SINK_CHILD_TLS_CERT"
TLS_KEY_ENV = "PROBE_SINK_CHILD_TLS_KEY"
MAX_FORKS_ENV = "PROBE_SINK_CHILD_MAX_FORKS"


class _Forwarder:
    """The registry events of the child's sink and hop streams, sent to the parent.

    Detections are found on the detection worker's thread, several per piece of work at load:
    they wait in a list and :meth:`flush` (which the worker calls after each piece of work)
    writes them as one :class:`~probe.measure.sinkwire.Batch`. Everything else goes at once."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._gone = False
        self._detections: list[tuple[object, ...]] = []

    def send(self, msg: wire.Message) -> None:
        with self._lock:
            self._write(wire.to_wire(msg))

    def flush(self) -> None:
        """Send the detections found since the last flush (detection worker's thread)."""
        if not self._detections:
            return
        with self._lock:
            found, self._detections = self._detections, []
            self._write(found[0] if len(found) == 1 else wire.to_wire(wire.Batch(tuple(found))))

    def _write(self, item: tuple[object, ...]) -> None:
        if self._gone:
            return
        try:
            self._conn.send(item)
        except OSError:
            # The parent is gone (killed, crashed): nobody to tell, so drop quietly and let
            # the reader's EOF end this process.
            self._gone = True

    def hop_connected(
        self, hop: str, session_id: str | None, trace: TraceContext | None = None
    ) -> None:
        self.send(wire.HopJoined(hop, session_id, trace))

    def hop_error(self, hop: str, session_id: str | None, error: str) -> None:
        self.send(wire.HopFailed(hop, session_id, error))

    def hop_silent(self, hop: str, session_id: str, since: float | None) -> None:
        self.send(wire.HopSilent(hop, session_id, since))

    def fork_rejected(self, reason: str) -> None:
        self.send(wire.ForkRejected(reason))

    def record_detection(
        self,
        hop: str,
        payload: bytes,
        arrival_time: float,
        *,
        score: float,
        session_hint: str | None = None,
    ) -> None:
        self._detections.append(
            wire.to_wire(wire.Detected(hop, payload, arrival_time, score, session_hint))
        )


def _renice_this_thread(nice: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _child(
    conn: Connection, host: str, port: int, idle_timeout: float, detect_nice: int = 0
) -> None:
    """The child process: serve the sink until told to stop; run the parent's detection streams.

    The parent sends batches of messages. One thread reads them and hands each batch, whole and
    in order, to the detection worker (one hand-over per batch, not per frame); drain and stop
    are answered from that thread."""
    from probe.aio.hopstream import DetectionWorker, HopStream
    from probe.aio.sink import Sink
    from probe.measure.expect import ExpectationBook

    forward = _Forwarder(conn)
    # Arrival stamps, the parent's and the fork sink's, are on the wall clock (module docstring).
    clock = time.time
    # As in the parent (probe.aio.runner): the detection thread must not hold the interpreter for
    # the default 5 ms while a fork frame waits to be stamped.
    sys.setswitchinterval(0.001)
    streams: dict[int, HopStream] = {}  # touched only on the detection worker's thread
    book = ExpectationBook()  # likewise

    def apply(work: list[wire.Message | tuple[Any, ...]], worker: DetectionWorker) -> None:
        stale = worker.stale()
        timed = False
        for msg in work:
            if type(msg) is tuple:  # a StreamAudio as it came off the wire: (tag, sid, data, at)
                if not timed:
                    # Since it arrived at the parent: its way here counts as waiting too.
                    worker.note_wait(clock() - msg[3])
                    timed = True
                st = streams.get(msg[1])
                if stale:
                    worker.shed += 1
                elif st is not None:
                    st.on_audio(msg[2], msg[3])
            elif isinstance(msg, wire.StreamAudio):
                st = streams.get(msg.sid)
                if stale:
                    worker.shed += 1
                elif st is not None:
                    st.on_audio(msg.data, msg.arrival)
            elif isinstance(msg, wire.Expect):
                book.add(msg.session, msg.payload, msg.send_time, msg.deadline)
                # Audio waiting longer than the marker timeout can no longer count: shed it.
                timeout = msg.deadline - msg.send_time
                if worker.shed_after_s is None or timeout > worker.shed_after_s:
                    worker.shed_after_s = timeout
            elif isinstance(msg, wire.OpenStream):
                streams[msg.sid] = HopStream(
                    forward, msg.hop, msg.audio, session_hint=msg.session, book=book
                )
            elif isinstance(msg, wire.StreamFormat):
                st = streams.get(msg.sid)
                if st is not None:
                    st.set_format(msg.audio)
            elif isinstance(msg, wire.CloseStream):
                st = streams.pop(msg.sid, None)
                if st is not None:
                    st.close()

    def close_all() -> None:
        for st in streams.values():
            st.close()
        streams.clear()

    def read(
        worker: DetectionWorker, sink: Sink, loop: asyncio.AbstractEventLoop, done: asyncio.Event
    ) -> None:
        def flush_sink() -> None:
            # Fork frames still waiting for their batch go to the worker before a drain mark.
            flushed = threading.Event()

            def flush() -> None:
                sink.flush()
                flushed.set()

            loop.call_soon_threadsafe(flush)
            flushed.wait(5.0)

        try:
            while True:
                batch = wire.from_wire(conn.recv())
                if not isinstance(batch, wire.Batch):
                    continue
                work: list[wire.Message | tuple[Any, ...]] = []
                for item in batch.messages:
                    # Audio, nearly every message at load, is handed over as it came (no
                    # message object made and taken apart again per frame).
                    if type(item) is tuple and len(item) == 4 and item[0] == _AUDIO_TAG:
                        work.append(item)
                        continue
                    msg = wire.from_wire(item)
                    if isinstance(msg, wire.Drain):
                        flush_sink()
                        if work:
                            worker.submit(apply, work, worker)
                            work = []
                        worker.drain()
                        forward.send(wire.Drained(msg.seq))
                    elif isinstance(msg, wire.Stop):
                        if work:
                            worker.submit(apply, work, worker)
                        return
                    else:
                        work.append(msg)
                if work:
                    worker.submit(apply, work, worker)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            loop.call_soon_threadsafe(done.set)

    async def report_health(worker: DetectionWorker) -> None:
        """Every ``_HEALTH_S``: how long detection work waited (work still queued included) and
        the frames shed; every second, this process's share of a core. A backlog is reported
        well within a marker timeout of the audio it holds back, so the parent knows it is
        overloaded before any of those markers expires (they are then unmeasured, not missed)."""
        meter = CpuShare()
        ticks = 0
        while True:
            await asyncio.sleep(_HEALTH_S)
            ticks += 1
            cpu = meter.read() if ticks % _CPU_TICKS == 0 else -1.0
            forward.send(wire.Health(worker.take_max_wait(), cpu, worker.take_shed()))

    async def main() -> None:
        worker = DetectionWorker(after=forward.flush)
        if detect_nice:
            # Detection is throughput work on stamped frames: below the pacing process, the
            # target and this process's own socket reads (which stamp arrivals) in the scheduler.
            worker.submit(_renice_this_thread, detect_nice)
        # A negative port: no fork sink, only the parent's detection streams (no hop forks).
        capability = os.environ.pop(CAPABILITY_ENV, "") or None
        max_forks = int(os.environ.pop(MAX_FORKS_ENV, "") or MAX_FORKS)
        cert, key = os.environ.pop(TLS_CERT_ENV, ""), os.environ.pop(TLS_KEY_ENV, "")
        try:
            tls = server_context(cert, key) if cert and key else None
        except ConfigError as exc:
            forward.send(wire.Failed(str(exc)))
            return
        sink = Sink(
            forward, worker, clock=clock, idle_timeout=idle_timeout, book=book,
            admission=Admission(capability), tls=tls, max_forks=max_forks,
        )
        url = ""
        if port >= 0:
            try:
                url = await sink.start(host, port)
            except ConfigError as exc:
                forward.send(wire.Failed(str(exc)))
                return
        forward.send(wire.Ready(url))
        health = asyncio.create_task(report_health(worker))
        done = asyncio.Event()
        reader = threading.Thread(
            target=read, args=(worker, sink, asyncio.get_running_loop(), done), daemon=True
        )
        reader.start()
        try:
            await done.wait()
        finally:
            health.cancel()
            await sink.stop()
            worker.submit(close_all)
            await asyncio.to_thread(worker.close)
            with contextlib.suppress(OSError):
                forward.send(wire.Stopped())

    from probe.aio.loop import run

    run(main())


def _import_root() -> str:
    """PYTHONPATH for the child: where this ``probe`` package is, then the caller's path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + rest if rest else "")


def spawn_child(
    host: str,
    port: int,
    idle_timeout: float,
    *,
    detect_nice: int = 0,
    capability: str | None = None,
    tls: tuple[str, str] | None = None,
    max_forks: int = MAX_FORKS,
) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start ``python -m probe.aio.sinkproc`` on one end of a socket pair; return the other end.

    ``port`` < 0 starts no fork sink (only detection streams, :meth:`SinkChild.open_stream`);
    ``detect_nice`` > 0 lowers the OS priority of the child's detection thread; ``capability``
    is what forks must present (:mod:`probe.measure.admission`), handed over in the child's
    environment (not its command line, which every user of the host can read)."""
    # A plain `python -m probe.aio.sinkproc` child: unlike multiprocessing's spawn it never
    # re-imports the caller's __main__ (locustfiles, scripts), and unlike fork it copies no
    # threads (nor a gevent hub).
    mine, theirs = socket.socketpair()
    # The child reads with blocking calls; under gevent's patching the pair is non-blocking.
    os.set_blocking(theirs.fileno(), True)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe.aio.sinkproc", str(theirs.fileno()), host, str(port),
             str(idle_timeout), str(detect_nice)],
            pass_fds=[theirs.fileno()],
            env={
                **os.environ,
                "PYTHONPATH": _import_root(),
                **({CAPABILITY_ENV: capability} if capability else {}),
                **({TLS_CERT_ENV: tls[0], TLS_KEY_ENV: tls[1]} if tls else {}),
                MAX_FORKS_ENV: str(max_forks),
            },
        )
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return mine, proc


def start_error(msg: wire.Message | None) -> ConfigError:
    """The ConfigError for a child that answered ``msg`` (or nothing) instead of ``ready``."""
    if isinstance(msg, wire.Failed):
        return ConfigError(msg.error)
    return ConfigError(f"the sink process did not start within {_START_TIMEOUT_S:.0f} s")


class RemoteStream:
    """A detection stream (the return direction of a session) run in the sink's child process;
    every call is one small message, never a wait."""

    def __init__(self, owner: SinkChild, sid: int) -> None:
        self._owner = owner
        self._sid = sid

    def feed(self, data: bytes, arrival: float) -> None:
        self._owner._send_audio(wire.StreamAudio(self._sid, data, arrival))

    def set_format(self, audio: AudioFormat) -> None:
        self._owner._send(wire.StreamFormat(self._sid, audio))

    def close(self) -> None:
        self._owner._send(wire.CloseStream(self._sid))


class SinkChild:
    """What every parent of the sink child shares, whatever its I/O: the streams it opens and
    how a message from the child lands in ``registry``. The I/O shells (:class:`SinkProcess`
    with threads for asyncio, ``probe.locust.sinkproc`` for gevent) provide ``_send``."""

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        idle_timeout: float = 30.0,
        capability: str | None = None,
        tls: tuple[str, str] | None = None,
        max_forks: int = MAX_FORKS,
    ) -> None:
        self.registry = registry
        self.max_forks = max_forks  # forks the child's sink holds at once
        self.idle_timeout = idle_timeout
        # What forks must present (the last path segment of the sink URL); None admits all.
        self.capability = capability
        self.tls = tls  # (certificate, key) files of a wss:// sink
        self.url = ""
        self._next_sid = 0
        # Why the child is gone before it was stopped (None while it runs or once stopped as
        # asked): from then on nothing is detected, so the run's figures are invalid.
        self.died: str | None = None
        # Return-direction audio queued for the child and not yet written to it (bytes), and
        # its bound: past it the child is not keeping up, and audio is dropped (counted as
        # shed, the generator flagged) instead of held in this process without limit.
        self.max_queued_audio = MAX_QUEUED_AUDIO_BYTES
        self.queued_audio = 0
        self.audio_dropped = 0  # frames
        self._queued_lock = threading.Lock()  # the shells write from another thread or greenlet

    def _lost(self, proc: subprocess.Popen[bytes] | None, code: int | None) -> None:
        """The child's end of the socket closed without ``Stopped``: say why, once."""
        if self.died is not None:
            return
        pid = proc.pid if proc is not None else "?"
        if code is None:
            how = "its connection to this process closed"
        elif code < 0:
            try:
                how = f"it was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"it was killed by signal {-code}"
        else:
            how = f"it exited with code {code}"
        self.died = (
            f"the probe's sink child process (pid {pid}) died: {how}; nothing was detected "
            "after that, so this run's figures are invalid"
        )
        log.error("%s", self.died)
        self.registry.record_heard(gone="sink")  # its death is the evidence, not its silence
        self.registry.record_dead("sink")

    @property
    def port(self) -> int:
        """The sink's bound port (0 before start or without a sink)."""
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0]) if self.url else 0

    def _send(self, msg: wire.Message) -> None:
        raise NotImplementedError

    def _send_audio(self, msg: wire.StreamAudio) -> None:
        """Queue return-direction audio for the child, within :attr:`max_queued_audio`."""
        n = len(msg.data)
        with self._queued_lock:
            queued = self.queued_audio
            if queued + n > self.max_queued_audio:
                self.audio_dropped += 1
            else:
                self.queued_audio = queued + n
                queued = -1
        if queued >= 0:
            self.registry.record_backlog(queued, self.max_queued_audio)
            self.registry.record_shed(1)
            return
        self._send(msg)

    def _stop_expected(self) -> None:
        """The shell is stopping the child: from now on it is not expected to report."""
        self.registry.record_heard(gone="sink")

    def _written(self, batch: list[wire.Message]) -> None:
        """The shell wrote ``batch`` to the child (or dropped it: the child is gone)."""
        n = sum(len(m.data) for m in batch if type(m) is wire.StreamAudio)
        if n:
            with self._queued_lock:
                self.queued_audio -= n

    def expect(self, session: str, payload: bytes, send_time: float, deadline: float) -> None:
        """A marker was sent: the child's streams of ``session`` look for it (informed
        detection). Fits :meth:`SessionRegistry.add_send_listener`."""
        self._send(wire.Expect(session, payload, send_time, deadline))

    def open_stream(self, hop: str, audio: AudioFormat, session: str) -> RemoteStream:
        """Detect markers in another stream (e.g. a session's return audio) in the child."""
        self._next_sid += 1
        self._send(wire.OpenStream(self._next_sid, hop, audio, session))
        return RemoteStream(self, self._next_sid)

    def _apply(self, msg: wire.Message) -> None:
        """Apply a registry message from the child (``Drained`` and ``Stopped`` are the
        shell's to handle)."""
        reg = self.registry
        if isinstance(msg, wire.Batch):
            for item in msg.messages:
                try:
                    part = wire.from_wire(item)
                except ValueError as exc:
                    log.error("%s", exc)
                    continue
                self._apply(part)
            return
        try:
            if isinstance(msg, wire.Detected):
                reg.record_detection(
                    msg.hop, msg.payload, msg.arrival, score=msg.score, session_hint=msg.hint
                )
            elif isinstance(msg, wire.HopJoined):
                reg.hop_connected(msg.hop, msg.session, msg.trace)
            elif isinstance(msg, wire.HopFailed):
                reg.hop_error(msg.hop, msg.session, msg.error)
            elif isinstance(msg, wire.HopSilent):
                reg.hop_silent(msg.hop, msg.session, msg.since)
            elif isinstance(msg, wire.ForkRejected):
                reg.fork_rejected(msg.reason)
            elif isinstance(msg, wire.Health):
                reg.record_heard("sink")
                reg.record_detection_delay(msg.delay_s)
                reg.record_shed(msg.shed)
                if msg.cpu >= 0.0:  # measured over the last second (not on every report)
                    reg.record_cpu("sink", msg.cpu)
        except Exception as exc:  # one bad message must not stop the reader
            log.error("sink message %s failed: %s", type(msg).__name__, exc)


class SinkProcess(SinkChild):
    """A :class:`~probe.aio.sink.Sink` in a child process, feeding ``registry`` in this one; a
    sender and a reader thread beside an asyncio loop."""

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        idle_timeout: float = 30.0,
        capability: str | None = None,
        tls: tuple[str, str] | None = None,
        max_forks: int = MAX_FORKS,
    ) -> None:
        super().__init__(
            registry, idle_timeout=idle_timeout, capability=capability, tls=tls,
            max_forks=max_forks,
        )
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._drained = -1
        self._drain_seq = 0
        self._stopped = False
        self._outbox: queue.SimpleQueue[wire.Message] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None

    def _send(self, msg: wire.Message) -> None:
        """Queue a message for the child; never blocks the caller (the event loop)."""
        if self._conn is not None and not self._stopped:
            self._outbox.put(msg)

    def _send_loop(self) -> None:
        """One thread writes to the child: everything queued within ``_FLUSH_S`` of the first
        message goes as one batch, so a busy child gets fewer, larger messages."""
        conn = self._conn
        assert conn is not None
        while True:
            batch = [self._outbox.get()]
            # As the Locust shell (probe.locust.sinkproc) writes every 10 ms. Writing whatever
            # was queued at once sent the child about one batch per frame at load: its reader
            # and detection threads woke for each (measured, benchmarks/sink_child.py at 100
            # sessions: 5000 batches a second). The arrival stamps are in the messages.
            time.sleep(_FLUSH_S)
            with contextlib.suppress(queue.Empty):
                while len(batch) < 4096:
                    batch.append(self._outbox.get_nowait())
            try:
                conn.send(wire.to_wire(wire.Batch(tuple(wire.to_wire(m) for m in batch))))
            except OSError as exc:
                log.warning("the sink process is gone: %s", exc)
                return
            self._written(batch)
            if any(isinstance(m, wire.Stop) for m in batch):
                return

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the child and its sink; return the sink's ws:// URL."""
        mine, proc = spawn_child(
            host, port, self.idle_timeout, capability=self.capability, tls=self.tls,
            max_forks=self.max_forks,
        )
        parent = Connection(mine.detach())
        self._conn, self._proc = parent, proc
        ready = await asyncio.to_thread(parent.poll, _START_TIMEOUT_S)
        msg = wire.from_wire(parent.recv()) if ready else None
        if not isinstance(msg, wire.Ready):
            proc.kill()
            proc.wait(5)
            parent.close()
            self._conn = None
            raise start_error(msg)
        self.url = msg.url
        self._reader = threading.Thread(target=self._read, name="probe-sink-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(
            target=self._send_loop, name="probe-sink-sender", daemon=True
        )
        self._sender.start()
        return self.url

    def _read(self) -> None:
        assert self._conn is not None
        stopped = False
        while True:
            try:
                msg = wire.from_wire(self._conn.recv())
            except (EOFError, OSError):
                break
            except ValueError as exc:
                log.error("%s", exc)
                continue
            self._apply(msg)
            if isinstance(msg, wire.Drained):
                with self._cond:
                    self._drained = max(self._drained, msg.seq)
                    self._cond.notify_all()
            elif isinstance(msg, wire.Stopped):
                stopped = True
                break
        if not stopped:
            code = None
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self._proc.wait(2.0)
            self._lost(self._proc, code)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def drain(self, timeout: float = 30.0) -> None:
        """Block until the child has detected everything received so far and it is applied."""
        if self._conn is None or self._stopped:
            return
        with self._cond:
            self._drain_seq += 1
            seq = self._drain_seq
        self._send(wire.Drain(seq))
        with self._cond:
            self._cond.wait_for(lambda: self._drained >= seq or self._stopped, timeout)

    async def stop(self) -> None:
        """Stop the sink, apply its last detections, end the child."""
        if self._conn is None:
            return
        self._stop_expected()
        # Queued even when the child is gone already: it ends the sender thread.
        self._outbox.put(wire.Stop())
        if self._sender is not None:
            await asyncio.to_thread(self._sender.join, 30.0)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 30.0)
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, 10.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait, 5.0)
        self._conn.close()
        self._conn = None


if __name__ == "__main__":
    _child(
        Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
        int(sys.argv[5]) if len(sys.argv) > 5 else 0,
    )
