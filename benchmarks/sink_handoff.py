"""How a gevent process should hand audio to the sink child: side by side, in one run.

A Locust worker sends every frame of every session's return direction to the sink child process
(probe.aio.sinkproc), which detects its markers. Two ways to do that from greenlets:

- ``hub``: what the worker uses (probe.locust.sinkproc.GeventSinkProcess): messages appended to a
  list, one flusher greenlet writes a batch every 10 ms to a gevent-cooperative socket; a reader
  greenlet applies the child's messages on the hub;
- ``threads``: the shape of probe.aio.sinkproc.SinkProcess with native OS threads (gevent's saved
  originals): a C SimpleQueue per message, a sender thread batching into ``Connection.send``, a
  reader thread blocking in ``Connection.recv`` handing messages to the hub through a deque that
  a greenlet drains every 50 ms.

Each of ``--streams`` greenlets feeds a 640-byte frame (20 ms of 16 kHz pcm16) on an absolute
schedule and records how late it woke (pacing lag); the child (``python -m probe.aio.sinkproc``
with no sink) detects on all of them either way. Printed per variant and round: this process's
CPU, the child's CPU, and the pacing lag p50/p99.

    python benchmarks/sink_handoff.py [--streams 200] [--hold 10] [--rounds 2]
"""

from __future__ import annotations

import os

from gevent import monkey

monkey.patch_all()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from gevent.queue import Empty  # noqa: E402

from probe.aio.sinkproc import SinkChild, spawn_child, start_error  # noqa: E402
from probe.audio.formats import encode  # noqa: E402
from probe.locust.sinkproc import GeventSinkProcess  # noqa: E402
from probe.measure.registry import SessionRegistry  # noqa: E402
from probe.protocol import AudioFormat  # noqa: E402
from probe.session.frames import carrier as _carrier  # noqa: E402

_start_thread = monkey.get_original("_thread", "start_new_thread")
_SimpleQueue = monkey.get_original("queue", "SimpleQueue")


class ThreadedSink(SinkChild):
    """The ``threads`` variant (module docstring)."""

    def __init__(self, registry: SessionRegistry) -> None:
        super().__init__(registry)
        self.proc: Any = None
        self._conn: Connection | None = None
        self._out: Any = _SimpleQueue()
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._pump: Any = None
        self._done = False

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._out.put(msg)

    def start(self) -> None:
        mine, proc = spawn_child("127.0.0.1", -1, 30.0)
        os.set_blocking(mine.fileno(), True)
        conn = Connection(mine.detach())
        msg = conn.recv()
        if msg[0] != "ready":
            raise start_error(msg)
        self.proc, self._conn = proc, conn
        _start_thread(self._send_loop, ())
        _start_thread(self._read_loop, ())
        self._pump = gevent.spawn(self._pump_loop)

    def _send_loop(self) -> None:
        assert self._conn is not None
        while True:
            batch = [self._out.get()]
            try:
                while len(batch) < 4096:
                    batch.append(self._out.get_nowait())
            except (queue.Empty, Empty):
                pass
            self._conn.send(("batch", batch))
            if batch[-1][0] == "stop":
                return

    def _read_loop(self) -> None:
        assert self._conn is not None
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            self._inbox.append(msg)
            if msg[0] == "stopped":
                break
        self._done = True

    def _pump_loop(self) -> None:
        while True:
            gevent.sleep(0.05)
            while self._inbox:
                self._apply(self._inbox.popleft())

    def stop(self) -> None:
        self._send(("stop",))
        while not self._done:
            gevent.sleep(0.02)
        self._pump.kill()
        while self.proc.poll() is None:
            gevent.sleep(0.02)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(variant: str, streams: int, hold_s: float, frames: list[bytes]) -> str:
    registry = SessionRegistry(clock=time.time, lock=threading.Lock())
    sink: Any
    if variant == "hub":
        sink = GeventSinkProcess(registry)
        sink.start("127.0.0.1", -1)
    else:
        sink = ThreadedSink(registry)
        sink.start()
    lags: list[float] = []
    measuring = [False]
    fmt = AudioFormat("pcm_s16le", 16000, 1)

    def stream(i: int) -> None:
        st = sink.open_stream("return", fmt, f"s{i}")
        base = time.monotonic() + i * 0.02 / streams
        n = 0
        while True:
            due = base + n * 0.02
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            if measuring[0]:
                lags.append(time.monotonic() - due)
            st.feed(frames[n % len(frames)], time.time())
            n += 1

    greenlets = [gevent.spawn(stream, i) for i in range(streams)]
    gevent.sleep(2.0)
    measuring[0] = True
    cpu0, child0, t0 = time.process_time(), _cpu_s(sink.proc.pid), time.monotonic()
    gevent.sleep(hold_s)
    wall = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    child = _cpu_s(sink.proc.pid) - child0
    measuring[0] = False
    gevent.killall(greenlets)
    sink.stop()
    a = np.array(lags) * 1000
    return (f"  {variant:7s}: this process CPU {100 * cpu / wall:5.1f} %, sink child CPU "
            f"{100 * child / wall:5.1f} %; pacing lag p50 {np.percentile(a, 50):5.2f} "
            f"p99 {np.percentile(a, 99):6.2f} ms ({len(a)} frames)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--hold", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    carrier, _ = _carrier("speech_en_scotland", 16000, 10.0)
    pcm = encode(carrier, "pcm_s16le")
    frames = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
    print(f"{args.streams} greenlets each handing a 20 ms frame to the sink child every 20 ms; "
          f"{args.hold:g} s measured per run; {os.cpu_count()} cores, shared")
    for r in range(args.rounds):
        print(f"round {r + 1}:")
        for variant in ("hub", "threads"):
            print(run(variant, args.streams, args.hold, frames), flush=True)


if __name__ == "__main__":
    main()
