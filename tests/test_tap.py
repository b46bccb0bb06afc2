"""probe.tap against the probe's real sink (and real misbehaving peers) on loopback: markers
written through the tap are found with the latency the writer knows, drops are counted, the fork
re-opens after a sink outage or restart without sending stale audio as if on time, and the wire
follows the fork contract byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import SLOW, free_port
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from probe.aio.hopstream import DetectionWorker
from probe.aio.sink import Sink
from probe.audio.formats import encode
from probe.measure.expect import ExpectationBook
from probe.measure.registry import Measurement, SessionRegistry
from probe.protocol import TraceContext
from probe.session.frames import carrier
from probe.tap import BlockingTap, ForkContext, Tap, from_headers, from_otel, from_start
from probe.tap.core import Backoff, DropWarnings, FrameQueue, TapStats
from probe.watermark.embed import embed

RATE = 16000
FRAME = 320  # 20 ms
AUDIO = {"encoding": "pcm_s16le", "sample_rate": RATE, "channels": 1}
TRACE = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
# The hop's pretend latency: markers are "sent" this long before the tap writes them.
DELAY_S = 0.08


class SinkThread:
    """The probe's in-process sink with a real registry and informed detection, on its own
    event loop thread, at a fixed loopback port so that it can be stopped and started again."""

    def __init__(self) -> None:
        self.registry = SessionRegistry(
            clock=time.time, marker_timeout=5.0, lock=threading.Lock()
        )
        self.worker = DetectionWorker()
        book = ExpectationBook()
        self.registry.add_send_listener(lambda *sent: self.worker.submit(book.add, *sent))
        self.book = book
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/sink"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sink: Sink | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10 * SLOW)

    def start(self) -> None:
        async def go() -> None:
            self.sink = Sink(self.registry, self.worker, clock=time.time, book=self.book)
            await self.sink.start("127.0.0.1", self.port)

        self._run(go())

    def stop(self) -> None:
        async def go() -> None:
            if self.sink is not None:
                await self.sink.stop()
                self.sink = None

        self._run(go())

    def settle(self) -> None:
        async def flush() -> None:
            if self.sink is not None:
                self.sink.flush()

        time.sleep(0.1)
        self._run(flush())
        self.worker.drain(10 * SLOW)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.worker.close()


@pytest.fixture
def sink() -> Iterator[SinkThread]:
    s = SinkThread()
    try:
        yield s
    finally:
        s.close()


class Speaker:
    """Marked speech for one session: marker sends recorded in the registry ``DELAY_S`` before
    the frame that holds them is written, so each marker's latency should be DELAY_S plus the
    tap's transit to the sink."""

    def __init__(self, registry: SessionRegistry, session: str, seconds: float) -> None:
        self.registry = registry
        self.session = session
        registry.open_session(session)
        speech, _ = carrier("speech_en_scotland", RATE, seconds)
        marked, placements = embed(
            speech, RATE, lambda i: registry.payload_for(session, i), every_s=0.6
        )
        self.pcm = encode(marked, "pcm_s16le")
        self.frames = len(marked) // FRAME
        self.markers: dict[int, list[tuple[int, int]]] = {}
        for p in placements:
            self.markers.setdefault(p.sample // FRAME, []).append((p.index, p.sample % FRAME))
        self.written_at: dict[int, float] = {}  # marker index -> write time of its first sample

    def frame(self, n: int) -> bytes:
        return self.pcm[2 * FRAME * n : 2 * FRAME * (n + 1)]

    def before_write(self, n: int) -> None:
        t = time.time()
        for index, offset in self.markers.get(n, ()):
            at = t + offset / RATE
            self.written_at[index] = at
            self.registry.record_send(self.session, index, at - DELAY_S)

    def measurements(self, hop: str) -> list[Measurement]:
        return [
            m for m in self.registry.measurements() if m.hop == hop and m.session == self.session
        ]


async def paced(
    speaker: Speaker, write: Callable[[bytes], None], at: Callable[[float], None] | None = None
) -> None:
    """Write the speaker's frames in real time; ``at(elapsed)`` runs before each frame."""
    loop = asyncio.get_running_loop()
    base = loop.time()
    for n in range(speaker.frames):
        delay = base + n * FRAME / RATE - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if at is not None:
            at(loop.time() - base)
        speaker.before_write(n)
        write(speaker.frame(n))


def transit_ms(ms: list[Measurement]) -> list[float]:
    return [(m.latency_s - DELAY_S) * 1000.0 for m in ms]


def test_markers_written_through_the_tap_are_found_with_the_writers_latency(
    sink: SinkThread,
) -> None:
    sink.start()
    speaker = Speaker(sink.registry, "tap-aio", 4.0)
    tap = Tap(sink.url, hop="asr-in")

    async def go() -> None:
        tap.open(speaker.session, TRACE, AUDIO)
        await paced(speaker, tap.write)
        await tap.aclose()

    asyncio.run(go())
    sink.settle()
    found = speaker.measurements("asr-in")
    assert len(found) == len(speaker.written_at) >= 5
    transit = transit_ms(found)
    # Arrival at the sink is stamped within a couple of ms of the write (loopback).
    assert statistics.median(transit) < 2.0 and min(transit) > -1.0, transit
    assert max(transit) < 10.0, transit
    stats = tap.stats
    assert stats.frames_sent == stats.frames_written == speaker.frames
    assert stats.dropped == 0 and stats.connects == 1 and stats.reconnects == 0
    assert not sink.registry.hop_errors()


def test_a_blocking_tap_writes_from_a_thread(sink: SinkThread) -> None:
    sink.start()
    speaker = Speaker(sink.registry, "tap-blocking", 3.0)
    tap = BlockingTap(sink.url, hop="tts-out")
    tap.open(speaker.session, str(TRACE), AUDIO)
    base = time.monotonic()
    for n in range(speaker.frames):
        delay = base + n * FRAME / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        speaker.before_write(n)
        tap.write(bytearray(speaker.frame(n)))  # copied: the caller may reuse its buffer
    tap.close(timeout=5.0 * SLOW)
    sink.settle()
    found = speaker.measurements("tts-out")
    assert len(found) == len(speaker.written_at) >= 4
    transit = transit_ms(found)
    assert statistics.median(transit) < 2.0 and max(transit) < 10.0, transit
    stats = tap.stats
    assert stats.frames_sent == speaker.frames and stats.dropped == 0
    tap.write(b"\x00" * 640)  # after close: nothing happens
    assert tap.stats.ignored == 1 and tap.stats.frames_written == speaker.frames


def test_queue_overflow_is_counted_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    url = f"ws://127.0.0.1:{free_port()}/sink"  # nothing listens
    # 0.1 s of 16 kHz pcm16 = 3200 bytes = five 20 ms frames.
    tap = Tap(url, hop="nowhere", queue_s=0.1, backoff_s=0.05, backoff_max_s=0.1,
              warn_every_s=3600)
    caplog.set_level(logging.WARNING, logger="probe.tap")

    async def go() -> None:
        tap.open("s1", None, AUDIO)
        for _ in range(50):
            tap.write(b"\x01\x00" * FRAME)
        await asyncio.sleep(0.3)
        for _ in range(50):
            tap.write(b"\x01\x00" * FRAME)
        await tap.aclose(5 * SLOW)

    asyncio.run(go())
    stats = tap.stats
    assert stats.frames_written == 100 and stats.frames_sent == 0
    # The first batch's last five aged out while waiting; the second batch's were lost at close.
    assert stats.dropped_full == 90 and stats.dropped_stale == 5 and stats.dropped_lost == 5
    assert stats.connect_failures >= 1 and stats.connects == 0
    assert stats.last_error is not None and "cannot connect to the sink" in stats.last_error
    warnings = [r.getMessage() for r in caplog.records if r.name == "probe.tap"]
    assert len(warnings) == 1, warnings
    assert "tap of hop 'nowhere'" in warnings[0] and "queue full" in warnings[0]
    tap.write(b"\x00\x00")
    assert tap.stats.ignored == 1 and tap.stats.frames_written == 100


def test_sink_down_at_start_then_up_reconnects_and_sends_nothing_stale(
    sink: SinkThread,
) -> None:
    speaker = Speaker(sink.registry, "tap-late-sink", 4.2)
    tap = Tap(sink.url, hop="late", backoff_s=0.05, backoff_max_s=0.2)
    up_at: list[float] = []
    started: list[asyncio.Future[None]] = []

    def up() -> None:
        sink.start()
        up_at.append(time.time())

    def at(elapsed: float) -> None:
        if elapsed >= 1.0 and not started:
            started.append(asyncio.get_running_loop().run_in_executor(None, up))

    async def go() -> None:
        tap.open(speaker.session, TRACE, AUDIO)
        await paced(speaker, tap.write, at)
        await tap.aclose()
        await asyncio.gather(*started)

    asyncio.run(go())
    sink.settle()
    found = speaker.measurements("late")
    after = [i for i, t in speaker.written_at.items() if t > up_at[0] + 0.5]
    assert len(after) >= 4
    assert {m.seq for m in found} >= set(after)
    # Audio written while the sink was down was dropped, never sent late as if on time.
    transit = transit_ms(found)
    assert max(transit) < 10.0, transit
    stats = tap.stats
    assert stats.connect_failures >= 1 and stats.reconnects == 1 and stats.connects == 1
    assert stats.dropped_stale > 10 and stats.frames_sent > 0
    assert stats.frames_sent + stats.dropped == stats.frames_written


def test_a_sink_restart_mid_stream_is_recovered(
    sink: SinkThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="probe.tap")
    sink.start()
    speaker = Speaker(sink.registry, "tap-restart", 5.0)
    tap = Tap(sink.url, hop="restart", backoff_s=0.05, backoff_max_s=0.2)
    events: list[tuple[str, float]] = []
    pending: list[asyncio.Future[None]] = []

    def change(what: str) -> None:
        # On a thread: the sink's stop waits for the tap's side of the closing handshake.
        events.append((what, time.time()))
        sink.stop() if what == "down" else sink.start()

    def at(elapsed: float) -> None:
        if (elapsed >= 1.5 and not pending) or (elapsed >= 2.2 and len(pending) == 1):
            what = "up" if pending else "down"
            pending.append(asyncio.get_running_loop().run_in_executor(None, change, what))

    async def go() -> None:
        tap.open(speaker.session, TRACE, AUDIO)
        await paced(speaker, tap.write, at)
        await tap.aclose()
        await asyncio.gather(*pending)

    asyncio.run(go())
    sink.settle()
    down, up = events[0][1], events[1][1]
    found = {m.seq for m in speaker.measurements("restart")}
    before = [i for i, t in speaker.written_at.items() if t < down - 0.3]
    after = [i for i, t in speaker.written_at.items() if t > up + 0.5]
    assert len(before) >= 2 and len(after) >= 3
    assert found >= set(before) | set(after)
    assert max(transit_ms(speaker.measurements("restart"))) < 10.0
    stats = tap.stats
    assert stats.disconnects == 1 and stats.reconnects == 1 and stats.connects == 2
    assert stats.connect_failures >= 1  # while it was down
    assert stats.frames_sent + stats.dropped == stats.frames_written
    warned = [r.getMessage() for r in caplog.records if r.name == "probe.tap"]
    assert warned[0] == (
        "tap of hop 'restart': 1 connection lost; last error: the sink closed the fork "
        "(code 1001)."
    )


def test_the_fork_contract_on_the_wire() -> None:
    """Start text, binary frames exactly as written and in order, stop, normal close; the URL's
    path and query as given; each connection after a drop starts again with the same start."""
    seen: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        conn: dict[str, Any] = {"path": ws.request.path if ws.request else None, "frames": []}
        seen.append(conn)
        try:
            async for frame in ws:
                conn["frames"].append(frame)
                # The first connection is dropped by the sink after two audio frames.
                if len(seen) == 1 and len(conn["frames"]) == 3:
                    await ws.close(1011, "restarting")
        except ConnectionClosed:
            pass
        conn["code"] = ws.close_code

    chunks = [bytes([i]) * (2 * FRAME) for i in range(1, 7)]
    tap = Tap(hop="vad.out", backoff_s=0.01, backoff_max_s=0.02, max_lag_s=5.0)

    async def go() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/sink/run-1?cap=s3cr%2Bt&x=1"
            tap.open("sess-1", TRACE, AUDIO, tracestate="k=v", sink=url)
            for chunk in chunks[:2]:
                tap.write(chunk)
                await asyncio.sleep(0.02)
            for _ in range(100):
                if tap.stats.disconnects:
                    break
                await asyncio.sleep(0.01)
            for chunk in chunks[2:]:
                tap.write(chunk)
                await asyncio.sleep(0.02)
            await tap.aclose()
            await asyncio.sleep(0.05)

    asyncio.run(go())
    assert len(seen) == 2
    hello = json.loads(seen[0]["frames"][0])
    assert hello == {
        "type": "start", "hop": "vad.out", "session": "sess-1", "traceparent": str(TRACE),
        "tracestate": "k=v", "audio": AUDIO,
    }
    assert seen[1]["frames"][0] == seen[0]["frames"][0]
    assert all(c["path"] == "/sink/run-1?cap=s3cr%2Bt&x=1" for c in seen)
    assert seen[0]["frames"][1:3] == chunks[:2] and seen[0]["code"] == 1011
    assert seen[1]["frames"][1:-1] == chunks[2:]
    assert json.loads(seen[1]["frames"][-1]) == {"type": "stop"}
    assert seen[1]["code"] == 1000
    assert tap.stats.frames_sent == 6 and tap.stats.dropped == 0


def test_a_sink_that_refuses_every_fork_is_retried_with_growing_backoff() -> None:
    connections: list[float] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(time.monotonic())
        await ws.recv()
        await ws.close(1008, "bad capability")

    tap = Tap(hop="refused", backoff_s=0.02, backoff_max_s=0.32, rng=random.Random(1))

    async def go() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            tap.open("s", None, AUDIO, sink=f"ws://127.0.0.1:{port}/sink")
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5
            while loop.time() < end:  # the hop keeps talking
                tap.write(b"\x00\x00" * FRAME)
                await asyncio.sleep(0.02)
            await tap.aclose()

    asyncio.run(go())
    # 20, 40, 80, 160, 320, 320 ... ms (each drawn from its upper half): not a hot loop.
    assert 3 <= len(connections) <= 10, len(connections)
    stats = tap.stats
    assert stats.last_error == "the sink closed the fork (code 1008: bad capability)"
    assert stats.disconnects == len(connections)


def test_a_sink_that_stops_reading_costs_drops_not_memory_or_waits() -> None:
    """A real peer that takes the start and then reads nothing: the socket's buffers fill, the
    tap stops writing to it directly, the queue fills to its bound and the rest is dropped."""
    release = asyncio.Event()

    async def stuck(ws: ServerConnection) -> None:
        await ws.recv()
        ws.transport.pause_reading()
        await release.wait()
        ws.transport.resume_reading()
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    tap = Tap(hop="stuck", queue_s=0.5, max_lag_s=60.0)
    frame = b"\x01\x02" * FRAME

    async def go() -> None:
        async with serve(stuck, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            try:
                tap.open("s", None, AUDIO, sink=f"ws://127.0.0.1:{port}/sink")
                await wait_until(lambda: tap.stats.connected)
                for i in range(40_000):  # 25.6 MB, far past the kernel's socket buffers
                    tap.write(frame)
                    if i % 500 == 0:
                        await asyncio.sleep(0)  # let the loop move bytes, as a host would
                stats = tap.stats
                # Held: the queue's bound (0.5 s of audio) and the one frame being sent.
                held = stats.frames_written - stats.frames_sent - stats.dropped
                assert 0 < (held - 1) * len(frame) <= 0.5 * RATE * 2, stats
                assert stats.dropped_full > 30_000, stats
            finally:
                release.set()
                await tap.aclose(10 * SLOW)

    asyncio.run(go())
    stats = tap.stats
    assert stats.frames_written == 40_000
    assert stats.frames_sent + stats.dropped == stats.frames_written
    assert stats.disconnects == 0 and stats.connects == 1


async def wait_until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds * SLOW
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_bad_setup_is_one_sentence_and_the_audio_path_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="probe.tap")
    with pytest.raises(ValueError, match=r"^hop must be 1-64 characters .*'bad hop'\.$"):
        Tap("ws://h/sink", hop="bad hop")
    with pytest.raises(ValueError, match=r"^sink_url must start with ws:// or wss://"):
        Tap("http://h/sink", hop="a")
    with pytest.raises(ValueError, match=r"^max_lag_s must be a number of seconds"):
        Tap("ws://h/sink", hop="a", max_lag_s=0)
    tap = Tap(hop="a")
    with pytest.raises(ValueError, match="has no sink URL"):
        tap.prepare("s", None, AUDIO)
    with pytest.raises(ValueError, match=r"^session must be 1-128 characters"):
        tap.prepare("a session", None, AUDIO, sink="ws://h/sink")
    with pytest.raises(ValueError, match=r"^audio.encoding 'opus' is not supported"):
        tap.prepare("s", None, {"encoding": "opus", "sample_rate": 48000, "channels": 1},
                    sink="ws://h/sink")
    with pytest.raises(ValueError, match="not a valid W3C traceparent"):
        tap.prepare("s", "00-xyz", AUDIO, sink="ws://h/sink")
    with pytest.raises(RuntimeError, match="running event loop"):
        tap.open("s", None, AUDIO, sink="ws://h/sink")
    tap.write(b"\x00\x00")  # never opened
    tap.write("not bytes")  # type: ignore[arg-type]
    # A context from a stream the hop does not own is never a reason to raise.
    assert tap.open_context(None) is False
    assert tap.open_context(from_start('{"type": "start", "session": "s1"}')) is False
    assert BlockingTap(hop="b").open_context(ForkContext(sink="ws://h/sink")) is False
    tap.write(12)  # type: ignore[arg-type]
    tap.close()
    stats = tap.stats
    assert stats.ignored == 3 and stats.frames_written == 0
    assert stats.last_error is not None and "write() takes bytes, not int" in stats.last_error
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "tap of hop 'a' not opened: the tap of hop 'a' has no sink URL: give one to Tap() or "
        "to open().",
        "tap of hop 'a' not opened: the tap of hop 'a' has no sink URL: give one to Tap() or "
        "to open().",
        "tap of hop 'b' not opened: open() needs the audio format of what the hop emits.",
    ]


def test_the_tap_imports_without_numpy_or_opentelemetry() -> None:
    code = (
        "import sys; import probe.tap; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'opentelemetry', "
        "'soxr', 'soundfile')); print(bad); assert not bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60 * SLOW)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the sans-I/O rules ------------------------------------------------------------------------


def test_frame_queue_bounds_bytes_and_ages_frames_out() -> None:
    stats = TapStats()
    q = FrameQueue(limit_bytes=300, max_lag_s=0.02)
    for i in range(5):  # written at 1.00 ... 1.04
        q.push(bytes([i]) * 100, 1.0 + i * 0.01, stats)
    # 1.00 and 1.01 were pushed out 30 ms after they were written: stale, not "full".
    assert stats.dropped_stale == 2 and q.queued_bytes == 300 and len(q) == 3
    q.push(bytes([8]) * 100, 1.045, stats)  # pushes out 1.02, 25 ms old: stale
    q.push(bytes([9]) * 100, 1.046, stats)  # pushes out 1.03, 16 ms old: the queue was full
    assert stats.dropped_stale == 3 and stats.dropped_full == 1
    # At 1.062, 1.04 waited 22 ms (stale); 1.045 waited 17 ms and goes.
    assert q.pop_fresh(1.062, stats) == bytes([8]) * 100
    assert stats.dropped_stale == 4
    assert q.has_fresh(1.062) and not q.has_fresh(1.07)
    q.drop_all(stats, now=1.05)
    assert stats.dropped_lost == 1 and stats.dropped == 6 and stats.dropped_bytes == 600
    assert q.queued_bytes == 0 and len(q) == 0


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    b = Backoff(0.1, 1.0, random.Random(0))
    delays = [b.next() for _ in range(8)]
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True))
    b.reset()
    assert b.next() <= 0.1


def test_drop_warnings_are_rate_limited() -> None:
    w = DropWarnings("h", every=10.0)
    s = TapStats()
    assert w.check(0.0, s) is None
    s.dropped_stale = 3
    first = w.check(1.0, s)
    assert first == "tap of hop 'h': 3 frames dropped (3 stale)."
    s.dropped_full = 1
    assert w.check(2.0, s) is None
    s.dropped_full = 5
    s.connect_failures = 1
    s.last_error = "x"
    assert w.check(5.0, s) is None
    later = w.check(11.5, s)
    assert later == (
        "tap of hop 'h': 5 frames dropped (5 queue full); 1 connection attempt failed "
        "in the last 10 s; last error: x."
    )
    assert w.check(30.0, s) is None


# --- where the session and trace context come from ---------------------------------------------


def test_context_from_a_probe_start_and_a_twilio_start() -> None:
    probe_start = json.dumps({
        "type": "start", "session": "b7f1", "traceparent": str(TRACE), "tracestate": "v=1",
        "audio": AUDIO, "sink": "ws://10.0.0.7:8766/sink?cap=1", "meta": {"a": "b"},
    })
    ctx = from_start(probe_start)
    assert ctx == ForkContext(session="b7f1", traceparent=TRACE, tracestate="v=1",
                              sink="ws://10.0.0.7:8766/sink?cap=1",
                              audio=from_start(probe_start).audio)  # type: ignore[union-attr]
    assert ctx is not None and ctx.audio is not None and ctx.audio.sample_rate == RATE
    child = ctx.hop_traceparent()
    assert child is not None and child.trace_id == TRACE.trace_id
    assert child.span_id != TRACE.span_id and child.flags == TRACE.flags

    twilio = json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
        "start": {"streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1",
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                  "customParameters": {"session": "s-2", "traceparent": str(TRACE),
                                       "sink": "ws://127.0.0.1:9/sink"}},
    })
    tctx = from_start(twilio)
    assert tctx is not None
    assert (tctx.session, tctx.traceparent, tctx.sink, tctx.stream_sid) == (
        "s-2", TRACE, "ws://127.0.0.1:9/sink", "MZ1")
    assert tctx.audio is not None and tctx.audio.encoding == "mulaw"

    # A real Twilio call has no probe parameters: nothing is invented, nothing raised.
    bare = from_start({"event": "start", "start": {"streamSid": "MZ2"}})
    assert bare is not None and bare.session is None and bare.traceparent is None
    assert from_start("not json") is None and from_start('{"event": "media"}') is None
    bad = from_start({"type": "start", "session": "a b", "traceparent": "00-nope",
                      "sink": "http://x"})
    assert bad is not None and (bad.session, bad.traceparent, bad.sink) == (None, None, None)
    assert len(bad.notes) == 3 and all(n.endswith("(ignored)") for n in bad.notes)


def test_context_from_handshake_headers_and_query() -> None:
    ctx = from_headers({"TraceParent": str(TRACE), "tracestate": "a=b"},
                       "session=abc&sink=ws%3A%2F%2Fh%3A1%2Fsink")
    assert (ctx.session, ctx.traceparent, ctx.tracestate, ctx.sink) == (
        "abc", TRACE, "a=b", "ws://h:1/sink")
    assert from_headers({}, "traceparent=" + str(TRACE)).traceparent == TRACE
    merged = ForkContext(session="x").merged(ctx)
    assert (merged.session, merged.traceparent) == ("x", TRACE)


def test_context_from_the_current_opentelemetry_span() -> None:
    from opentelemetry import baggage, context
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    assert from_otel().traceparent is None
    token = context.attach(baggage.set_baggage("probe.session", "otel-session"))
    try:
        with tracer.start_as_current_span("hop") as span:
            sc = span.get_span_context()
            ctx = from_otel()
    finally:
        context.detach(token)
    assert ctx.own_span and ctx.session == "otel-session"
    assert ctx.traceparent == TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}",
                                         int(sc.trace_flags))
    assert ctx.hop_traceparent() == ctx.traceparent  # the hop's own span, not a child


def test_the_rules_of_the_tap_and_the_tee_are_sans_io() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "probe"
    shell = {"socket", "asyncio", "gevent", "threading", "websockets", "selectors"}
    offenders = []
    for path in (root / "tap" / "core.py", root / "tap" / "context.py", root / "tee.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in shell]
    assert offenders == []
