"""ProbeTapProcessor inside real Pipecat pipelines (Pipecat's own ``run_test`` harness), forking to
a real WebSocket peer on loopback that records what it gets. Runs in Pipecat's environment
(PROBE_PIPECAT_PYTHON) with the repository on PYTHONPATH; tests/test_pipecat.py runs it.

    python tests/pipecat_checks.py [NAME ...]

Prints ``ok NAME`` for each check that held and ``FAIL NAME: why`` (with the traceback on stderr)
for each that did not; exits 1 if any failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loguru import logger  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    InputAudioRawFrame,
    OutputAudioRawFrame,
    TextFrame,
    TTSAudioRawFrame,
)
from pipecat.runner.types import CallData  # noqa: E402
from pipecat.tests.utils import run_test  # noqa: E402
from websockets.asyncio.server import ServerConnection, serve  # noqa: E402

from probe.integrations.pipecat import ProbeTapProcessor, fork_context  # noqa: E402
from probe.tap import ForkContext  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SESSION = "b7f1c2d0e4a94f0f9a51c3d2e1f00a11"


class Recorder:
    """A sink stand-in: every connection's path and messages, in order."""

    def __init__(self) -> None:
        self.streams: list[dict[str, Any]] = []
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        stream: dict[str, Any] = {
            "path": ws.request.path if ws.request is not None else "",
            "messages": [],
        }
        self.streams.append(stream)
        async for msg in ws:
            stream["messages"].append(msg)

    async def wait_streams(self, n: int, timeout: float = 5.0) -> None:
        """Until ``n`` streams ended with stop (the tap closes in the background)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [s for s in self.streams if s["messages"][-1:] == ['{"type":"stop"}']]
            if len(done) >= n:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"expected {n} fork streams ending in stop, got {self.streams!r}")


def _pcm(n: int, rate: int, start: int = 0) -> bytes:
    """20 ms of distinct pcm16 bytes, so that each frame's bytes can be told apart."""
    k = rate // 50
    return bytes(((start + i) * 7 + n) % 256 for i in range(2 * k))


def _ins(n: int, rate: int, start: int = 0) -> list[Any]:
    return [
        InputAudioRawFrame(audio=_pcm(i, rate, start), sample_rate=rate, num_channels=1)
        for i in range(n)
    ]


def _outs(n: int, rate: int, start: int = 0, kind: Any = OutputAudioRawFrame) -> list[Any]:
    return [kind(audio=_pcm(i, rate, start), sample_rate=rate, num_channels=1) for i in range(n)]


def _start(stream: dict[str, Any]) -> dict[str, Any]:
    first = stream["messages"][0]
    assert isinstance(first, str), first
    obj: dict[str, Any] = json.loads(first)
    return obj


def _twilio_start(params: dict[str, str]) -> dict[str, Any]:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": "MZ" + "1" * 32,
        "start": {
            "streamSid": "MZ" + "1" * 32,
            "callSid": "CA" + "2" * 32,
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }


async def check_passes_every_frame_unchanged_and_forks_input_audio(rec: Recorder) -> None:
    """Every frame comes out the same object, in order per kind; input audio is forked as it
    is, with the frames' own format in each fork's start, and a new stream when it changes."""
    call = CallData(
        stream_id="MZ" + "1" * 32,
        call_id="CA" + "2" * 32,
        body={"session": SESSION, "traceparent": TRACEPARENT, "sink": rec.url},
    )
    # A generous max_lag_s: this check is about the bytes, not about ageing out (probe.tap's).
    tap = ProbeTapProcessor(hop="bot.in", frames="input", context=call, max_lag_s=5.0)
    ins16 = _ins(5, 16000)
    outs = _outs(3, 16000, 9)
    texts = [TextFrame(text=f"t{i}") for i in range(2)]
    ins8 = _ins(2, 8000, 3)
    sent = [*ins16[:2], outs[0], texts[0], *ins16[2:], *outs[1:], texts[1], *ins8]
    down, up = await run_test(tap, frames_to_send=sent)
    assert up == [], up
    for kind in (InputAudioRawFrame, OutputAudioRawFrame, TextFrame):
        want = [id(f) for f in sent if type(f) is kind]
        got = [id(f) for f in down if type(f) is kind]
        assert got == want, (kind.__name__, got, want)
    assert len(down) == len(sent), (len(down), len(sent))
    await rec.wait_streams(2)
    first, second = rec.streams
    for stream, frames, rate in ((first, ins16, 16000), (second, ins8, 8000)):
        start = _start(stream)
        assert start["type"] == "start" and start["hop"] == "bot.in", start
        assert start["session"] == SESSION, start
        assert start["audio"] == {"encoding": "pcm_s16le", "sample_rate": rate, "channels": 1}
        version, trace_id, span_id, flags = start["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01"), start
        assert span_id != "00f067aa0ba902b7", "the fork names its own span, not the caller's"
        assert stream["messages"][1:-1] == [f.audio for f in frames], stream["messages"]
        assert stream["messages"][-1] == '{"type":"stop"}'
    assert tap.stats.frames_sent == 7 and tap.stats.dropped == 0, tap.stats


async def check_output_tap_forks_output_audio_only(rec: Recorder) -> None:
    """frames='output' (the default) forks OutputAudioRawFrame and TTSAudioRawFrame, not input."""
    tap = ProbeTapProcessor(
        hop="bot.tts", context=_twilio_start({"session": SESSION, "sink": rec.url}), max_lag_s=5.0
    )
    outs = _outs(3, 24000, kind=TTSAudioRawFrame)
    ins = _ins(3, 16000)
    await run_test(tap, frames_to_send=[ins[0], outs[0], ins[1], outs[1], outs[2], ins[2]])
    await rec.wait_streams(1)
    (stream,) = rec.streams
    start = _start(stream)
    assert start["audio"]["sample_rate"] == 24000 and start["session"] == SESSION, start
    assert "traceparent" not in start, start
    assert stream["messages"][1:-1] == [f.audio for f in outs]


async def check_every_context_source(rec: Recorder) -> None:
    """CallData, the older dict call data, customParameters, a Twilio or probe start as text or
    mapping, and a ForkContext all name the same stream; anything else is refused at setup."""
    params = {"session": SESSION, "traceparent": TRACEPARENT, "sink": rec.url}
    twilio = _twilio_start(params)
    probe_start = {
        "type": "start",
        **params,
        "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1},
    }
    sources: list[object] = [
        CallData(stream_id="MZ1", call_id="CA1", body=params),
        {"stream_id": "MZ1", "call_id": "CA1", "body": params},
        params,
        twilio,
        json.dumps(twilio),
        json.dumps(twilio).encode(),
        probe_start,
        json.dumps(probe_start),
    ]
    for source in sources:
        ctx = fork_context(source)
        assert (ctx.session, str(ctx.traceparent), ctx.sink) == (SESSION, TRACEPARENT, rec.url), (
            source,
            ctx,
        )
    assert fork_context(None) == ForkContext()
    for bad in (42, "not json", {"event": "media"}, object()):
        try:
            fork_context(bad)
        except ValueError:
            continue
        raise AssertionError(f"fork_context({bad!r}) did not refuse it")
    try:
        ProbeTapProcessor(hop="bad hop")
    except ValueError:
        pass
    else:
        raise AssertionError("a hop name with a space was taken")
    try:
        ProbeTapProcessor(hop="x", frames="both")  # type: ignore[arg-type]
    except ValueError:
        pass
    else:
        raise AssertionError("frames='both' was taken")
    # A value that is not valid is left out, not raised.
    ctx = fork_context({"session": "no spaces allowed", "sink": rec.url})
    assert ctx.session is None and ctx.sink == rec.url and ctx.notes, ctx


async def check_start_sink_wins_and_sink_url_is_the_fallback(rec: Recorder) -> None:
    """The sink named by the start is used even when sink_url is given; sink_url serves a start
    that names none. Both are used exactly as given (path and query)."""
    named = rec.url + "?cap=from-start"
    fallback = rec.url + "?cap=configured"
    (frame,) = _ins(1, 8000)
    tap = ProbeTapProcessor(
        hop="a", frames="input", sink_url=fallback, context={"sink": named}, max_lag_s=5.0
    )
    await run_test(tap, frames_to_send=[frame])
    tap = ProbeTapProcessor(
        hop="b", frames="input", sink_url=fallback, context={"session": SESSION}, max_lag_s=5.0
    )
    await run_test(tap, frames_to_send=[frame])
    await rec.wait_streams(2)
    assert [s["path"] for s in rec.streams] == ["/sink?cap=from-start", "/sink?cap=configured"]


async def check_otel_context_when_the_start_names_no_trace(rec: Recorder) -> None:
    """No session or trace in the context: the current OTel span (as the hop's own span) and the
    probe.session baggage entry are used."""
    from opentelemetry import baggage, context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    span = NonRecordingSpan(
        SpanContext(int(TRACE_ID, 16), 0xB9C7C989F97918E1, False, TraceFlags(1))
    )
    ctx = baggage.set_baggage("probe.session", SESSION, trace.set_span_in_context(span))
    token = context.attach(ctx)
    try:
        tap = ProbeTapProcessor(hop="otel", frames="input", sink_url=rec.url, max_lag_s=5.0)
        await run_test(tap, frames_to_send=_ins(1, 16000))
    finally:
        context.detach(token)
    await rec.wait_streams(1)
    start = _start(rec.streams[0])
    assert start["session"] == SESSION, start
    assert start["traceparent"] == f"00-{TRACE_ID}-b9c7c989f97918e1-01", start


async def check_no_sink_or_a_dead_sink_never_stops_the_audio(rec: Recorder) -> None:
    """Without any sink URL the tap warns once and forks nothing; with a sink nobody listens
    on, frames are dropped and counted. Either way every frame passes, on time."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("probe.tap").addHandler(handler)
    try:
        frames = _ins(20, 8000)
        tap = ProbeTapProcessor(hop="nosink", frames="input", context={"session": SESSION})
        down, _ = await run_test(tap, frames_to_send=frames)
        assert [id(f) for f in down] == [id(f) for f in frames]
        assert tap.stats.frames_sent == 0
        warned = [r.getMessage() for r in records if "nosink" in r.getMessage()]
        assert len(warned) == 1 and "no sink URL" in warned[0], warned
        tap = ProbeTapProcessor(hop="dead", frames="input", sink_url="ws://127.0.0.1:9/sink")
        t0 = time.monotonic()
        down, _ = await run_test(tap, frames_to_send=frames)
        assert [id(f) for f in down] == [id(f) for f in frames]
        assert time.monotonic() - t0 < 2.0
        stats = tap.stats
        assert stats.frames_written == 20 and stats.frames_sent == 0 and stats.dropped == 20, stats
    finally:
        logging.getLogger("probe.tap").removeHandler(handler)


async def check_a_tap_of_the_wrong_kind_says_so(rec: Recorder) -> None:
    """An output tap that only ever saw input audio warns at the end, naming frames='input'."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("probe.tap").addHandler(handler)
    try:
        tap = ProbeTapProcessor(hop="wrong", sink_url=rec.url)
        frames = _ins(3, 8000)
        await run_test(tap, frames_to_send=frames)
    finally:
        logging.getLogger("probe.tap").removeHandler(handler)
    warned = [r.getMessage() for r in records]
    assert any("forked no audio" in m and "frames='input'" in m for m in warned), warned
    assert rec.streams == []


CHECKS: dict[str, Callable[[Recorder], Awaitable[None]]] = {
    name.removeprefix("check_"): fn
    for name, fn in dict(globals()).items()
    if name.startswith("check_") and callable(fn)
}


async def run(names: list[str]) -> int:
    failed = 0
    for name in names:
        rec = Recorder()
        async with serve(rec.handler, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            rec.url = f"ws://127.0.0.1:{port}/sink"
            try:
                await asyncio.wait_for(CHECKS[name](rec), 30)
                print(f"ok {name}", flush=True)
            except Exception as exc:
                failed += 1
                traceback.print_exc()
                print(f"FAIL {name}: {exc!r}"[:2000], flush=True)
    return 1 if failed else 0


def main() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    names = sys.argv[1:] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        sys.exit(f"unknown checks: {unknown}; known: {list(CHECKS)}")
    sys.exit(asyncio.run(run(names)))


if __name__ == "__main__":
    main()
