"""The sink in a child process, so fork traffic and detection never share a GIL with the pacing.

With many sessions the sink receives several frames for every frame the source sends (one per
hop) and runs the detector on all of them. In the same process that work competes with the
pacing loop for the interpreter: frames are handed to the socket late (send lag). Here the
:class:`~probe.sink.Sink` and its :class:`~probe.hopstream.DetectionWorker` run in a child process
with their own event loop, and so does detection of the return direction's audio, which the
source hands over frame by frame (:meth:`SinkProcess.open_stream`). What the registry needs (hop
connected, hop error, detection) comes back over a socket pair as small tuples and is applied to
the parent's registry by one reader thread. The parent process is left with no CPU-heavy thread:
a thread that holds the interpreter makes every socket send of the pacing loop wait for it
(measured before this change: 85 us per send and p99 send lag 160 ms at 30 sessions).

Clock: the child stamps arrivals with ``time.time``, the wall clock the parent's source uses for
send times, on the same host (PROTOCOL.md section 4). A run with any other injected clock uses
the in-process sink instead (see :mod:`probe.runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, cast

from probe.errors import ConfigError
from probe.measure.registry import SessionRegistry
from probe.protocol import AudioFormat, TraceContext

log = logging.getLogger(__name__)

__all__ = [
    "MessageReader",
    "RemoteStream",
    "SinkChild",
    "SinkProcess",
    "encode_message",
    "spawn_child",
    "start_error",
]

_START_TIMEOUT_S = 30.0
_HEADER = struct.Struct("!i")
_HEADER64 = struct.Struct("!Q")


class _RegistryProxy:
    """What the sink and its hop streams call on a registry, sent to the parent as tuples."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._gone = False

    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._lock:
            if self._gone:
                return
            try:
                self._conn.send(msg)
            except OSError:
                # The parent is gone (killed, crashed): nobody to tell, so drop quietly and let
                # the reader's EOF end this process.
                self._gone = True

    def hop_connected(
        self, hop: str, session_id: str | None, trace: TraceContext | None = None
    ) -> None:
        self._send(("hop", hop, session_id, trace))

    def hop_error(self, hop: str, session_id: str | None, error: str) -> None:
        self._send(("hop_error", hop, session_id, error))

    def record_detection(
        self,
        hop: str,
        payload: bytes,
        arrival_time: float,
        *,
        score: float,
        session_hint: str | None = None,
    ) -> None:
        self._send(("det", hop, payload, arrival_time, score, session_hint))


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
    from probe.hopstream import DetectionWorker, HopStream
    from probe.measure.expect import ExpectationBook
    from probe.sink import Sink

    proxy = _RegistryProxy(conn)
    # As in the parent (probe.runner): the detection thread must not hold the interpreter for
    # the default 5 ms while a fork frame waits to be stamped.
    sys.setswitchinterval(0.001)
    registry = cast(SessionRegistry, proxy)
    streams: dict[int, HopStream] = {}  # touched only on the detection worker's thread
    book = ExpectationBook()  # likewise

    def apply(work: list[tuple[Any, ...]]) -> None:
        for msg in work:
            kind = msg[0]
            if kind == "audio":
                st = streams.get(msg[1])
                if st is not None:
                    st.on_audio(msg[2], msg[3])
            elif kind == "expect":
                book.add(msg[1], msg[2], msg[3], msg[4])
            elif kind == "open":
                streams[msg[1]] = HopStream(
                    registry, msg[2], msg[3], session_hint=msg[4], book=book
                )
            elif kind == "fmt":
                st = streams.get(msg[1])
                if st is not None:
                    st.set_format(msg[2])
            elif kind == "close":
                st = streams.pop(msg[1], None)
                if st is not None:
                    st.close()

    def close_all() -> None:
        for st in streams.values():
            st.close()
        streams.clear()

    def read(worker: DetectionWorker, loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
        try:
            while True:
                _, batch = conn.recv()
                work: list[tuple[Any, ...]] = []
                for msg in batch:
                    if msg[0] == "drain":
                        if work:
                            worker.submit(apply, work)
                            work = []
                        worker.drain()
                        proxy._send(("drained", msg[1]))
                    elif msg[0] == "stop":
                        if work:
                            worker.submit(apply, work)
                        return
                    else:
                        work.append(msg)
                if work:
                    worker.submit(apply, work)
        except (EOFError, OSError):
            pass
        finally:
            loop.call_soon_threadsafe(done.set)

    async def main() -> None:
        worker = DetectionWorker()
        if detect_nice:
            # Detection is throughput work on stamped frames: below the pacing process, the
            # target and this process's own socket reads (which stamp arrivals) in the scheduler.
            worker.submit(_renice_this_thread, detect_nice)
        # A negative port: no fork sink, only the parent's detection streams (no hop forks).
        sink = Sink(registry, worker, clock=time.time, idle_timeout=idle_timeout, book=book)
        url = ""
        if port >= 0:
            try:
                url = await sink.start(host, port)
            except ConfigError as exc:
                proxy._send(("error", str(exc)))
                return
        proxy._send(("ready", url))
        done = asyncio.Event()
        reader = threading.Thread(
            target=read, args=(worker, asyncio.get_running_loop(), done), daemon=True
        )
        reader.start()
        try:
            await done.wait()
        finally:
            await sink.stop()
            worker.submit(close_all)
            await asyncio.to_thread(worker.close)
            with contextlib.suppress(OSError):
                proxy._send(("stopped",))

    asyncio.run(main())


def _import_root() -> str:
    """PYTHONPATH for the child: where this ``probe`` package is, then the caller's path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + rest if rest else "")


class MessageReader:
    """Sans-I/O reader of the messages :class:`multiprocessing.connection.Connection` frames
    (a 4-byte big-endian length, then a pickle): bytes in, messages out. For a parent whose I/O
    is not a blocking ``Connection.recv`` (a gevent-cooperative socket)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
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
            if len(buf) - start < size:
                break
            out.append(pickle.loads(memoryview(buf)[start : start + size]))
            pos = start + size
        del buf[:pos]
        return out


def encode_message(obj: Any) -> bytes:
    """``obj`` framed as :meth:`multiprocessing.connection.Connection.send` frames it."""
    body = pickle.dumps(obj)
    if len(body) > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _HEADER64.pack(len(body)) + body
    return _HEADER.pack(len(body)) + body


def spawn_child(
    host: str, port: int, idle_timeout: float, *, detect_nice: int = 0
) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start ``python -m probe.sinkproc`` on one end of a socket pair; return the other end.

    ``port`` < 0 starts no fork sink (only detection streams, :meth:`SinkChild.open_stream`);
    ``detect_nice`` > 0 lowers the OS priority of the child's detection thread."""
    # A plain `python -m probe.sinkproc` child: unlike multiprocessing's spawn it never
    # re-imports the caller's __main__ (locustfiles, scripts), and unlike fork it copies no
    # threads (nor a gevent hub).
    mine, theirs = socket.socketpair()
    # The child reads with blocking calls; under gevent's patching the pair is non-blocking.
    os.set_blocking(theirs.fileno(), True)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe.sinkproc", str(theirs.fileno()), host, str(port),
             str(idle_timeout), str(detect_nice)],
            pass_fds=[theirs.fileno()],
            env={**os.environ, "PYTHONPATH": _import_root()},
        )
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return mine, proc


def start_error(msg: Any) -> ConfigError:
    """The ConfigError for a child that answered ``msg`` (or nothing) instead of ``ready``."""
    if msg is not None and msg[0] == "error":
        return ConfigError(str(msg[1]))
    return ConfigError(f"the sink process did not start within {_START_TIMEOUT_S:.0f} s")


class RemoteStream:
    """A detection stream (the return direction of a session) run in the sink's child process;
    every call is one small message, never a wait."""

    def __init__(self, owner: SinkChild, sid: int) -> None:
        self._owner = owner
        self._sid = sid

    def feed(self, data: bytes, arrival: float) -> None:
        self._owner._send(("audio", self._sid, data, arrival))

    def set_format(self, audio: AudioFormat) -> None:
        self._owner._send(("fmt", self._sid, audio))

    def close(self) -> None:
        self._owner._send(("close", self._sid))


class SinkChild:
    """What every parent of the sink child shares, whatever its I/O: the streams it opens and
    how a message from the child lands in ``registry``. The I/O shells (:class:`SinkProcess`
    with threads for asyncio, ``probe.locust.sinkproc`` for gevent) provide ``_send``."""

    def __init__(self, registry: SessionRegistry, *, idle_timeout: float = 30.0) -> None:
        self.registry = registry
        self.idle_timeout = idle_timeout
        self.url = ""
        self._next_sid = 0

    @property
    def port(self) -> int:
        """The sink's bound port (0 before start or without a sink)."""
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0]) if self.url else 0

    def _send(self, msg: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def expect(self, session: str, payload: bytes, send_time: float, deadline: float) -> None:
        """A marker was sent: the child's streams of ``session`` look for it (informed
        detection). Fits :meth:`SessionRegistry.add_send_listener`."""
        self._send(("expect", session, payload, send_time, deadline))

    def open_stream(self, hop: str, audio: AudioFormat, session: str) -> RemoteStream:
        """Detect markers in another stream (e.g. a session's return audio) in the child."""
        self._next_sid += 1
        self._send(("open", self._next_sid, hop, audio, session))
        return RemoteStream(self, self._next_sid)

    def _apply(self, msg: tuple[Any, ...]) -> str:
        """Apply a registry message from the child; return its kind (``drained``, ``stopped``
        are the shell's to handle)."""
        kind = str(msg[0])
        reg = self.registry
        try:
            if kind == "det":
                _, hop, payload, arrival, score, hint = msg
                reg.record_detection(hop, payload, arrival, score=score, session_hint=hint)
            elif kind == "hop":
                reg.hop_connected(msg[1], msg[2], msg[3])
            elif kind == "hop_error":
                reg.hop_error(msg[1], msg[2], msg[3])
        except Exception as exc:  # one bad message must not stop the reader
            log.error("sink message %r failed: %s", kind, exc)
        return kind


class SinkProcess(SinkChild):
    """A :class:`~probe.sink.Sink` in a child process, feeding ``registry`` in this one; a
    sender and a reader thread beside an asyncio loop."""

    def __init__(self, registry: SessionRegistry, *, idle_timeout: float = 30.0) -> None:
        super().__init__(registry, idle_timeout=idle_timeout)
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._drained = -1
        self._drain_seq = 0
        self._stopped = False
        self._outbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None

    def _send(self, msg: tuple[Any, ...]) -> None:
        """Queue a message for the child; never blocks the caller (the event loop)."""
        if self._conn is not None and not self._stopped:
            self._outbox.put(msg)

    def _send_loop(self) -> None:
        """One thread writes to the child: everything queued since the last write goes as one
        batch, so a busy child gets fewer, larger messages."""
        conn = self._conn
        assert conn is not None
        while True:
            batch = [self._outbox.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 4096:
                    batch.append(self._outbox.get_nowait())
            try:
                conn.send(("batch", batch))
            except OSError as exc:
                log.warning("the sink process is gone: %s", exc)
                return
            if any(m[0] == "stop" for m in batch):
                return

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the child and its sink; return the sink's ws:// URL."""
        mine, proc = spawn_child(host, port, self.idle_timeout)
        parent = Connection(mine.detach())
        self._conn, self._proc = parent, proc
        ready = await asyncio.to_thread(parent.poll, _START_TIMEOUT_S)
        msg = parent.recv() if ready else None
        if msg is None or msg[0] != "ready":
            proc.kill()
            proc.wait(5)
            parent.close()
            self._conn = None
            raise start_error(msg)
        self.url = str(msg[1])
        self._reader = threading.Thread(target=self._read, name="probe-sink-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(
            target=self._send_loop, name="probe-sink-sender", daemon=True
        )
        self._sender.start()
        return self.url

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = self._apply(msg)
            if kind == "drained":
                with self._cond:
                    self._drained = max(self._drained, int(msg[1]))
                    self._cond.notify_all()
            elif kind == "stopped":
                break
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
        self._send(("drain", seq))
        with self._cond:
            self._cond.wait_for(lambda: self._drained >= seq or self._stopped, timeout)

    async def stop(self) -> None:
        """Stop the sink, apply its last detections, end the child."""
        if self._conn is None:
            return
        self._send(("stop",))
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
