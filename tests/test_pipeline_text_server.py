"""The reference pipeline's text hop over real loopback sockets: a real client streams a fixture
sentence and silence, and times the JSON results that come back on its connection."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from probe.audio.fixtures import fixture_script, load_fixture
from probe.audio.formats import encode
from probe.pipeline import ReferencePipeline
from probe.protocol import TwilioSender, parse_traceparent

FACTOR = float(os.environ.get("PROBE_TEST_TIMEOUT_FACTOR", "1"))
TIMEOUT = 5.0 * FACTOR
FRAME = 0.020
INGRESS_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ATTEMPTS = 3  # timing on a shared CI box: a real regression fails every attempt, a busy core not
DELAY, EVERY, ENDPOINT = 0.150, 0.250, 0.250


@dataclass
class Run:
    frame_sends: list[float] = field(default_factory=list)  # send time of each audio frame
    texts: list[tuple[float, str]] = field(default_factory=list)  # (arrival, text frame)
    binary: int = 0
    close_code: int | None = None


async def _sleep_until(deadline: float) -> None:
    if deadline - time.time() > 0.001:
        await asyncio.sleep(deadline - time.time() - 0.001)
    while time.time() < deadline:
        await asyncio.sleep(0)


async def _stream(url: str, first: str, frames: list[str | bytes], stop: str,
                  before: list[str] | None = None) -> Run:
    run = Run()
    async with connect(url, compression=None, close_timeout=TIMEOUT) as ws:

        async def read(ws: ClientConnection) -> None:
            try:
                async for message in ws:
                    if isinstance(message, bytes):
                        run.binary += 1
                    else:
                        run.texts.append((time.time(), message))
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(read(ws))
        await ws.send(first)
        for message in before or []:
            await ws.send(message)
        base = time.time() + 0.05
        for i, frame in enumerate(frames):
            await _sleep_until(base + i * FRAME)
            run.frame_sends.append(time.time())
            await ws.send(frame)
        await ws.send(stop)
        await asyncio.wait_for(reader, TIMEOUT)  # the pipeline closes once its results are out
        run.close_code = ws.close_code
    return run


def _sentence(rate: int) -> tuple[str, np.ndarray]:
    x, _ = load_fixture("speech_en_us", rate=rate)
    script = fixture_script("speech_en_us")
    assert script is not None
    s = script[0]
    return s.text, x[round(s.start_s * rate):round(s.end_s * rate)]


def _expected_send(run: Run, index: int, rate: int) -> float:
    """When the client sent sample `index` (its frame's send time plus its place in it)."""
    n = round(FRAME * rate)
    return run.frame_sends[index // n] + (index % n) / rate


def _check_timing(run: Run, results: list[dict[str, Any]], rate: int, end: int,
                  end_of: Any) -> tuple[list[float], list[float]]:
    """Each result's arrival minus its configured time (seconds), and their absolute values."""
    errors = []
    for (arrival, _), msg in zip(run.texts, results, strict=True):
        stop = end_of(msg)
        if msg.get("final", msg.get("type") == "final"):
            due = _expected_send(run, end, rate) + ENDPOINT + DELAY
        else:
            due = _expected_send(run, stop, rate) + DELAY
        errors.append(arrival - due)
    return errors, [abs(e) for e in errors]


def test_text_hop_sends_timed_results_on_the_client_connection() -> None:
    rate = 16000
    text, audio = _sentence(rate)
    lead = round(0.2 * rate)
    x = np.concatenate([np.zeros(lead), audio, np.zeros(rate)]).astype(np.float32)
    n = round(FRAME * rate)
    frames: list[str | bytes] = [encode(x[i:i + n], "pcm_s16le") for i in range(0, len(x), n)]
    start = json.dumps({"type": "start", "session": "stt-1", "traceparent": INGRESS_TP,
                        "audio": {"encoding": "pcm_s16le", "sample_rate": rate, "channels": 1}})
    end = lead + len(audio)
    words = text.lower().rstrip(".").split()

    async def main() -> Run:
        async with ReferencePipeline("stt:150ms:text", idle_timeout=None) as pipeline:
            assert pipeline.url is not None
            return await _stream(pipeline.url, start, frames, '{"type": "stop"}')

    for attempt in range(ATTEMPTS):
        run = asyncio.run(asyncio.wait_for(main(), 30 * FACTOR))
        assert run.binary == 0 and run.close_code == 1000
        *results_text, (_, stop) = run.texts
        assert json.loads(stop) == {"type": "stop"}
        run.texts = results_text
        msgs = [json.loads(m) for _, m in run.texts]
        interims, finals = msgs[:-1], msgs[-1:]
        offsets = [lead + k * round(EVERY * rate) for k in range(1, 40)]
        offsets = [o for o in offsets if o < end]
        assert [m["end_ms"] for m in interims] == [o * 1000 / rate for o in offsets]
        for m in msgs:
            assert list(m) == ["type", "final", "text", "start_ms", "end_ms", "trace_id"]
            assert m["type"] == "result" and m["trace_id"] == TRACE_ID
            assert m["start_ms"] == lead * 1000 / rate == 200
        assert all(m["final"] is False for m in interims)
        assert interims[-1]["text"] == " ".join(words[:len(interims[-1]["text"].split())])
        assert len(interims[-1]["text"].split()) >= len(words) - 1
        assert finals == [{"type": "result", "final": True, "text": text, "start_ms": 200,
                           "end_ms": end * 1000 / rate, "trace_id": TRACE_ID}]
        errors, absolute = _check_timing(run, msgs, rate, end,
                                         lambda m: round(m["end_ms"] * rate / 1000))
        # p50 within 2 ms; a busy shared core may hold back a few results, never most of them
        within = sum(e < 0.005 * FACTOR for e in absolute) / len(absolute)
        if statistics.median(absolute) < 0.002 and within >= 0.8:
            break
        if attempt == ATTEMPTS - 1:
            shown = [round(e * 1e3, 2) for e in errors]
            raise AssertionError(f"result send times off by {shown} ms")


def test_text_hop_in_the_twilio_dialect_after_an_audio_hop() -> None:
    rate = 8000
    text, audio = _sentence(rate)
    lead = round(0.1 * rate)
    x = np.concatenate([np.zeros(lead), audio, np.zeros(rate)]).astype(np.float32)
    n = round(FRAME * rate)
    sender = TwilioSender("MZ123", "CA456", "twilio-stt", parse_traceparent(INGRESS_TP))
    connected, started = sender.connected(), sender.start()
    frames: list[str | bytes] = [sender.media(encode(x[i:i + n], "mulaw"))
                                 for i in range(0, len(x), n)]
    stop = sender.stop()
    end = lead + len(audio)

    async def main() -> Run:
        async with ReferencePipeline("asr:20ms,stt:150ms:text=generic:nooffsets",
                                     dialect="twilio", idle_timeout=None) as pipeline:
            assert pipeline.url is not None
            return await _stream(pipeline.url, connected, frames, stop,
                                 before=[started])

    for attempt in range(ATTEMPTS):
        run = asyncio.run(asyncio.wait_for(main(), 30 * FACTOR))
        assert run.binary == 0 and run.close_code == 1000
        msgs = [json.loads(m) for _, m in run.texts]  # plain JSON text frames, no stop in Twilio
        assert [m["type"] for m in msgs][-1] == "final"
        assert all(m["type"] == "partial" and set(m) == {"type", "text"} for m in msgs[:-1])
        assert msgs[-1] == {"type": "final", "text": text}
        # results come a hop's 20 ms on top: the final 20 + 250 + 150 ms after the sentence's end
        final_at = run.texts[-1][0] - _expected_send(run, end, rate)
        if abs(final_at - (0.020 + ENDPOINT + DELAY)) < 0.005 * FACTOR:
            break
        assert attempt < ATTEMPTS - 1, f"the final came {final_at * 1e3:.1f} ms after the end"
