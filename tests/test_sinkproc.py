"""The sink in a child process: start errors come back as one sentence; stop is clean."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from probe.errors import ConfigError
from probe.measure.registry import SessionRegistry
from probe.sinkproc import SinkProcess


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

    registry = SessionRegistry(clock=time.time)
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
        await asyncio.to_thread(sink.drain, 10.0)
        await sink.stop()
        assert sink._proc is not None and sink._proc.returncode == 0

    asyncio.run(go())
    assert "asr" in registry.hops()


def test_message_reader_reads_what_a_connection_sends_whatever_the_chunking() -> None:
    from multiprocessing.connection import Connection

    from probe.sinkproc import MessageReader, encode_message

    msgs = [
        ("det", "a", b"\x01\x02\x03\x04", 12.5, 9.1, "s1"),
        ("batch", [("audio", 1, b"\x00" * 640, 1.0)] * 300),
        ("drained", 7),
        ("ready", ""),
    ]
    mine, theirs = socket.socketpair()
    conn = Connection(theirs.detach())
    try:
        for m in msgs:
            conn.send(m)
        wire = b""
        mine.settimeout(5)
        while len(wire) < sum(len(encode_message(m)) for m in msgs):
            wire += mine.recv(1 << 16)
        # Our framing is Connection's, byte for byte.
        assert wire == b"".join(encode_message(m) for m in msgs)
        for size in (1, 3, 4, 5, 1000, len(wire)):
            reader = MessageReader()
            got: list[object] = []
            for i in range(0, len(wire), size):
                got += reader.feed(wire[i : i + size])
            assert got == msgs
        # And a Connection reads what encode_message frames.
        mine.sendall(encode_message(("batch", [("stop",)])))
        assert conn.recv() == ("batch", [("stop",)])
    finally:
        conn.close()
        mine.close()
