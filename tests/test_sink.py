"""The in-process sink: batched hand-over to detection, and the one idle watchdog."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from probe.aio.hopstream import DetectionWorker
from probe.aio.sink import Sink
from probe.audio.formats import encode
from probe.protocol import TraceContext
from probe.session.frames import carrier
from probe.watermark.design import session_payload
from probe.watermark.embed import embed

START = json.dumps({
    "type": "start", "hop": "asr", "session": "s1",
    "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1},
})


class Recorder:
    """The registry calls a sink makes, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def hop_connected(
        self, hop: str, session_id: str | None, trace: TraceContext | None = None
    ) -> None:
        self.calls.append(("connected", hop, session_id))

    def hop_error(self, hop: str, session_id: str | None, error: str) -> None:
        self.calls.append(("error", hop, session_id, error))

    def record_detection(
        self,
        hop: str,
        payload: bytes,
        arrival_time: float,
        *,
        score: float,
        session_hint: str | None = None,
    ) -> None:
        self.calls.append(("detected", hop, payload, arrival_time))


def test_frames_of_many_forks_reach_detection_in_batches_with_their_arrival_stamps() -> None:
    speech, _ = carrier("speech_en_scotland", 16000, 3.0)
    marked, placements = embed(
        speech, 16000, lambda i: session_payload(0x123456, i), every_s=0.6
    )
    assert len(placements) >= 4
    pcm = encode(marked, "pcm_s16le")
    reg = Recorder()
    worker = DetectionWorker(time.monotonic)
    submits: list[int] = []
    real_submit = worker.submit

    def counting_submit(fn: Any, *args: object) -> None:
        submits.append(1)
        real_submit(fn, *args)

    worker.submit = counting_submit  # type: ignore[method-assign]
    forks = 3

    async def go() -> None:
        sink = Sink(reg, worker, clock=time.time, batch_s=0.05)
        url = await sink.start("127.0.0.1", 0)

        async def fork() -> None:
            async with connect(url) as ws:
                await ws.send(START)
                for i in range(0, len(pcm), 640):
                    await ws.send(pcm[i : i + 640])
                    if i % (640 * 25) == 0:
                        await asyncio.sleep(0)
                await ws.send('{"type": "stop"}')

        await asyncio.gather(*(fork() for _ in range(forks)))
        await asyncio.sleep(0.1)
        sink.flush()
        await asyncio.to_thread(worker.drain, 10.0)
        await sink.stop()

    asyncio.run(go())
    worker.close()
    frames = forks * -(-len(pcm) // 640)
    found = [c for c in reg.calls if c[0] == "detected"]
    assert sorted(c[2] for c in found) == sorted([p.payload for p in placements] * forks)
    # Far fewer hand-overs to the detection thread than frames received.
    assert 0 < len(submits) < frames / 5
    # Arrival stamps are when each frame was read, not when its batch ran.
    assert all(abs(c[3] - time.time()) < 60 for c in found)
    assert not [c for c in reg.calls if c[0] == "error"]


def test_a_fork_that_goes_silent_is_closed_once_as_stalled() -> None:
    reg = Recorder()
    worker = DetectionWorker(time.monotonic)
    codes: list[tuple[int | None, str | None]] = []

    async def go() -> None:
        sink = Sink(reg, worker, clock=time.time, idle_timeout=0.4)
        url = await sink.start("127.0.0.1", 0)
        async with connect(url) as ws:
            await ws.send(START)
            await ws.send(b"\x00\x00" * 320)
            try:
                await asyncio.wait_for(ws.recv(), 5.0)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                codes.append((rcvd.code, rcvd.reason) if rcvd else (None, None))
        # A connection that never sends start is closed the same way.
        async with connect(url) as ws2:
            try:
                await asyncio.wait_for(ws2.recv(), 5.0)
            except ConnectionClosed as exc:
                codes.append((exc.rcvd.code if exc.rcvd else None, None))
        await asyncio.sleep(0.2)
        await sink.stop()

    asyncio.run(go())
    worker.close()
    assert codes == [(1008, "idle fork"), (1008, None)]
    errors = [c for c in reg.calls if c[0] == "error"]
    assert [(e[1], e[2]) for e in errors] == [("asr", "s1"), ("unknown", None)]
    assert all("stalled" in e[3] for e in errors)


def test_an_overloaded_sink_sheds_audio_that_waited_past_the_marker_timeout() -> None:
    """Audio whose batch waited longer than shed_after_s is dropped unsearched and counted;
    the stream's close still runs (nothing found in it could count any more)."""
    import threading

    from probe.measure.health import GeneratorHealth
    from probe.measure.registry import SessionRegistry

    reg = Recorder()
    worker = DetectionWorker(time.monotonic)
    worker.shed_after_s = 0.2
    gate = threading.Event()
    fed: list[int] = []
    closed: list[bool] = []

    class Stream:
        def on_audio(self, data: bytes, arrival: float) -> None:
            fed.append(len(data))

        def close(self) -> None:
            closed.append(True)

    async def go() -> None:
        sink = Sink(reg, worker, clock=time.time, batch_s=0.01)
        st = Stream()
        worker.submit(gate.wait)  # the worker is busy: what follows waits in the queue
        sink._submit(st.on_audio, b"\x00" * 640, 1.0, audio=True)
        sink._submit(st.on_audio, b"\x00" * 640, 1.02, audio=True)
        sink._submit(st.close)
        sink.flush()
        await asyncio.sleep(0.4)  # past shed_after_s
        gate.set()
        await asyncio.to_thread(worker.drain, 5.0)
        # Fresh audio is searched again.
        sink._submit(st.on_audio, b"\x00" * 640, 2.0, audio=True)
        sink.flush()
        await asyncio.to_thread(worker.drain, 5.0)

    asyncio.run(go())
    worker.close()
    assert fed == [640] and closed == [True]
    assert worker.take_shed() == 2 and worker.take_shed() == 0
    # The registry's generator summary carries what the child reports.
    registry = SessionRegistry(clock=time.time, health=GeneratorHealth())
    registry.record_shed(2)
    gen = registry.generator()
    assert gen is not None and gen["frames_shed"] == 2


def test_idle_forks_that_never_started_are_one_report_error_with_a_count() -> None:
    """Hundreds of connections that never send start, closed idle by the sink, make one error
    line on hop 'unknown' with their count, not one per connection."""
    from probe.measure.registry import SessionRegistry

    reg = SessionRegistry(clock=time.time)
    worker = DetectionWorker(time.monotonic)
    n = 200

    async def go() -> list[int | None]:
        sink = Sink(reg, worker, clock=time.time, idle_timeout=0.5)
        url = await sink.start("127.0.0.1", 0)
        conns = [await connect(url) for _ in range(n)]

        async def close_code(ws: Any) -> int | None:
            try:
                await asyncio.wait_for(ws.recv(), 10.0)
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None
            return -1

        codes = await asyncio.gather(*(close_code(ws) for ws in conns))
        await asyncio.sleep(0.2)
        await sink.stop()
        return list(codes)

    codes = asyncio.run(go())
    worker.close()
    assert codes == [1008] * n
    errors = reg.hop_errors()["unknown"]
    assert [e.as_dict() for e in errors] == [
        {"session": None, "error": "fork sent nothing for 0 s (stalled)", "count": n}
    ]


def test_a_forks_frames_reach_detection_in_order_across_format_changes_fragments_and_stop(
) -> None:
    """Binary messages of a started fork are taken straight from the protocol callback; a text
    message or a fragmented one goes through the handler. Either way the detection worker gets
    every frame, format change and the close in the order sent, and nothing after stop."""
    worker = DetectionWorker(time.monotonic)
    handed: list[tuple[str, object]] = []
    real_submit = worker.submit

    def recording_submit(fn: Any, *args: object) -> None:
        for f, a, _audio in args[0]:  # type: ignore[attr-defined]
            handed.append((f.__name__, a[0] if a else None))
        real_submit(fn, *args)

    worker.submit = recording_submit  # type: ignore[method-assign]
    restart = json.dumps({**json.loads(START), "audio": {
        "encoding": "pcm_s16le", "sample_rate": 8000, "channels": 1}})
    sent: list[tuple[str, object]] = []

    async def go() -> None:
        sink = Sink(Recorder(), worker, clock=time.time, batch_s=0.01)
        url = await sink.start("127.0.0.1", 0)
        async with connect(url) as ws:
            await ws.send(START)
            n = 0

            async def frame() -> None:
                nonlocal n
                n += 1
                data = n.to_bytes(2, "little") * 8
                await ws.send(data)
                sent.append(("on_audio", data))

            for _ in range(20):
                await frame()
            await asyncio.sleep(0.05)
            for _ in range(5):
                await frame()
            await ws.send(restart)
            sent.append(("set_format", None))
            for _ in range(5):
                await frame()

            async def pieces() -> Any:
                yield b"\x07\x07" * 4
                yield b"\x08\x08" * 4

            await ws.send(pieces())
            sent.append(("on_audio", b"\x07\x07" * 4 + b"\x08\x08" * 4))
            for _ in range(10):
                await frame()
            await ws.send('{"type": "stop"}')
            await ws.send(b"\x09\x09" * 8)  # after stop: ignored
        await asyncio.sleep(0.1)
        sink.flush()
        await asyncio.to_thread(worker.drain, 10.0)
        await sink.stop()

    asyncio.run(go())
    worker.close()
    got = [(name, arg if name == "on_audio" else None) for name, arg in handed]
    assert got == [*sent, ("close", None)]
