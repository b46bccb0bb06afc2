"""The sink in a child process: start errors come back as one sentence; stop is clean."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from probe.aio.sinkproc import SinkProcess
from probe.errors import ConfigError
from probe.measure.registry import SessionRegistry


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def go() -> None:
            await SinkProcess(SessionRegistry(clock=time.time)).start("127.0.0.1", port)

        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(go())


def test_a_fork_start_reaches_the_parent_registry_and_stop_is_clean() -> None:
    from websockets.asyncio.client import connect

    from probe.measure.health import GeneratorHealth

    registry = SessionRegistry(clock=time.time, health=GeneratorHealth())
    registry.open_session("s1")

    async def go() -> None:
        sink = SinkProcess(registry)
        url = await sink.start("127.0.0.1", 0)
        async with connect(url) as ws:
            await ws.send('{"type": "start", "hop": "asr", "session": "s1", '
                          '"audio": {"encoding": "pcm_s16le", "sample_rate": 16000, '
                          '"channels": 1}}')
            await ws.send(b"\x00\x00" * 320)
            await ws.send('{"type": "stop"}')
        await asyncio.sleep(1.5)  # the child reports its health every second
        await asyncio.to_thread(sink.drain, 10.0)
        await sink.stop()
        assert sink._proc is not None and sink._proc.returncode == 0

    asyncio.run(go())
    assert "asr" in registry.hops()
    # The child's health reached the registry: its CPU share, far from saturated.
    assert registry.health is not None
    cpu = registry.health._cpu.get("sink")
    assert cpu is not None and 0.0 <= cpu[1] < 0.95


def test_typed_messages_frame_as_a_connection_does_whatever_the_chunking() -> None:
    from multiprocessing.connection import Connection

    from probe.measure import sinkwire as w
    from probe.protocol import AudioFormat, TraceContext

    msgs: list[w.Message] = [
        w.Detected("a", b"\x01\x02\x03\x04", 12.5, 9.1, "s1"),
        w.Batch(tuple(w.to_wire(w.StreamAudio(1, b"\x00" * 640, 1.0)) for _ in range(300))),
        w.HopJoined("b", "s1", TraceContext("a" * 32, "b" * 16, 1)),
        w.OpenStream(3, "return", AudioFormat("mulaw", 8000, 1), "s1"),
        w.Drained(7),
        w.Health(0.25, 0.4),
        w.Ready(""),
    ]
    mine, theirs = socket.socketpair()
    conn = Connection(theirs.detach())
    try:
        for m in msgs:
            conn.send(w.to_wire(m))
        data = b""
        mine.settimeout(5)
        while len(data) < sum(len(w.encode(m)) for m in msgs):
            data += mine.recv(1 << 16)
        # The framing is Connection's, byte for byte.
        assert data == b"".join(w.encode(m) for m in msgs)
        for size in (1, 3, 4, 5, 1000, len(data)):
            reader = w.Reader()
            got: list[w.Message] = []
            for i in range(0, len(data), size):
                got += reader.feed(data[i : i + size])
            assert got == msgs
        # And a Connection reads what encode frames.
        mine.sendall(w.encode(w.Batch((w.to_wire(w.Stop()),))))
        assert w.from_wire(conn.recv()) == w.Batch((("stop",),))
        with pytest.raises(ValueError, match="not a sink message"):
            w.from_wire(("nonsense", 1))
        with pytest.raises(ValueError, match="malformed Drained"):
            w.from_wire(("drained", 1, 2))
    finally:
        conn.close()
        mine.close()


def test_return_audio_that_waited_since_its_arrival_is_reported_as_detection_delay() -> None:
    """Return audio stamped 4 s before the child searches it (it waited in the parent, the socket
    pair or the queue) is a 4 s detection delay within a quarter second: the generator is
    flagged before the markers that audio holds back could expire."""
    from probe.measure.health import GeneratorHealth
    from probe.protocol import AudioFormat

    health = GeneratorHealth()
    registry = SessionRegistry(clock=time.time, health=health)
    registry.open_session("s1")

    async def go() -> None:
        sink = SinkProcess(registry)
        await sink.start("127.0.0.1", -1)
        stream = sink.open_stream("return", AudioFormat("pcm_s16le", 16000, 1), "s1")
        stream.feed(b"\x00\x00" * 320, time.time() - 4.0)
        await asyncio.sleep(0.6)
        await asyncio.to_thread(sink.drain, 10.0)
        await sink.stop()

    asyncio.run(go())
    assert health.update(time.time())
    (breach,) = health.summary()["periods"][0]["evidence"]
    assert breach["signal"] == "detection_delay" and breach["value"] >= 4.0


def test_detection_work_still_queued_counts_as_waiting() -> None:
    """A detection thread stuck on one piece of work shows a growing delay before the work
    behind it runs: a backlog is reported while it builds."""
    import threading

    from probe.aio.hopstream import DetectionWorker

    worker = DetectionWorker(time.monotonic)
    gate = threading.Event()
    worker.submit(gate.wait)
    worker.submit(lambda: None)
    time.sleep(0.3)
    waited = worker.take_max_wait()
    assert waited >= 0.3
    gate.set()
    worker.drain(5.0)
    assert worker.take_max_wait() < waited + 0.2  # what ran, nothing queued any more
    assert worker.take_max_wait() == 0.0
    worker.close()
