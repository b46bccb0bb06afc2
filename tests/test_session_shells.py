"""The asyncio and the gevent shell drive the same session core: against the same scripted peer
they leave the same records (markers sent and detected, latencies, reply latencies, close
reasons)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import scripted_peer as peer
from conftest import SLOW

from probe.aio.hopstream import DetectionWorker
from probe.aio.source import run_session
from probe.measure.registry import SessionRegistry

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, str(HERE / "scripted_peer.py"), "serve"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def _asyncio(url: str, reply: bool) -> dict[str, Any]:
    registry = SessionRegistry(clock=time.time, marker_timeout=2.0, lock=threading.Lock())
    worker = DetectionWorker()

    def opener(hop: str, audio: Any, session: str) -> peer.InlineStream:
        return peer.InlineStream(registry, hop, audio, session)

    try:
        res = asyncio.run(run_session(peer.config(url, reply), registry, worker, session="s-1",
                                      open_stream=opener))
        worker.drain(10)
    finally:
        worker.close()
    return peer.records(registry, res.error)


def _gevent(url: str, reply: bool) -> dict[str, Any]:
    args = [sys.executable, str(HERE / "scripted_peer.py"), "gevent", url]
    res = subprocess.run(args + (["reply"] if reply else []), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("path, reply", [("echo", False), ("drop", False), ("bot", True)])
def test_both_shells_leave_the_same_records(port: int, path: str, reply: bool) -> None:
    url = f"ws://127.0.0.1:{port}/{path}"
    a, g = _asyncio(url, reply), _gevent(url, reply)
    for key in ("error", "sent", "detected", "replies_missed"):
        assert a[key] == g[key], (key, a, g)
    # Timings come from two runs of a live peer (its own event loop schedules the echo): equal to
    # within that scheduling jitter, which a loaded machine widens.
    jitter_ms = 10.0 * SLOW
    for key in ("latency_ms", "replies_ms"):
        assert len(a[key]) == len(g[key]), (key, a, g)
        for x, y in zip(a[key], g[key], strict=True):
            assert abs(x - y) < jitter_ms, (key, a, g)
    if path == "echo":
        assert a["detected"] == a["sent"] and len(a["sent"]) >= 3
        assert all(abs(v - 1000 * peer.DELAY) < jitter_ms for v in a["latency_ms"])
    if path == "drop":
        assert a["error"] == "target closed the connection after 0.50 s: close 1011 scripted"
    if path == "bot":
        # The bot answers 300 ms after it decides the utterance ended (25 silent frames later).
        assert len(a["replies_ms"]) >= 1 and all(abs(v - 800) < 60 for v in a["replies_ms"])
