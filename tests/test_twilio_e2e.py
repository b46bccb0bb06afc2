"""The measurement chain in the Twilio Media Streams dialect against the reference pipeline in
Twilio mode: `probe run --dialect twilio`, per-hop latencies beside the configured delays."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe.cli import main
from probe.pipeline import ReferencePipeline, parse_hops

HOPS = "a:20ms,b:35ms:mulaw8k,c:120ms"


@pytest.fixture
def twilio_pipeline() -> Iterator[str]:
    """The reference pipeline in Twilio mode, on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    pipeline = ReferencePipeline(parse_hops(HOPS), dialect="twilio")
    ready = threading.Event()
    url: list[str] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        url.append(loop.run_until_complete(pipeline.start("127.0.0.1", 0)))
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield url[0]
    finally:
        asyncio.run_coroutine_threadsafe(pipeline.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def test_probe_run_in_the_twilio_dialect(twilio_pipeline: str, tmp_path: Path) -> None:
    out = tmp_path / "twilio.json"
    code = main([
        "run", "--target", twilio_pipeline, "--dialect", "twilio", "--sessions", "2",
        "--concurrency", "2", "--duration", "4", "--marker-timeout", "3",
        "--hop-order", "a,b,c,return", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["sessions"]["completed"] == 2, report["sessions"]
    hops = {h["name"]: h for h in report["hops"]}
    assert list(hops) == ["a", "b", "c", "return"]
    for name, want in {"a": 20.0, "b": 55.0, "c": 175.0}.items():
        h = hops[name]
        m = h["markers"]
        assert m["sent"] == m["detected"] + m["missed"] > 0
        assert m["detected"] >= 0.9 * m["sent"], (name, m)
        assert abs(h["latency_ms"]["p50"] - want) < 4.0, (name, h["latency_ms"])
    # The return direction comes back as Twilio media events for the same streamSid.
    ret = hops["return"]
    assert ret["markers"]["detected"] >= 0.9 * ret["markers"]["sent"] > 0
    assert ret["latency_ms"]["p50"] >= 175.0
