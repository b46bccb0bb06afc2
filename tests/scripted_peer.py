"""A scripted peer on loopback, and a driver that runs one probe session through either shell.

Peer behaviour by URL path: ``/echo`` sends every audio frame back 40 ms after it arrived;
``/bot`` answers each utterance (25 silent frames after speech) 300 ms later with a 0.6 s tone;
``/drop`` closes with 1011 after 25 frames. Run as ``python tests/scripted_peer.py serve`` it
prints its port and serves until killed; ``python tests/scripted_peer.py gevent URL [reply]``
runs one session through the gevent shell and prints its records as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RATE = 16000
DELAY = 0.04


def tone(seconds: float) -> list[bytes]:
    """A 440 Hz tone at -12 dBFS in 20 ms pcm_s16le frames at 16 kHz."""
    from probe.audio.formats import encode

    t = np.arange(int(seconds * RATE)) / RATE
    x = (0.25 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    frame = RATE // 50
    return [encode(x[i : i + frame], "pcm_s16le") for i in range(0, len(x), frame)]


async def _serve() -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    from probe.audio.formats import decode

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []

        async def later(at: float, data: bytes) -> None:
            await asyncio.sleep(max(0.0, at - loop.time()))
            await ws.send(data)

        async def reply() -> None:
            await asyncio.sleep(0.3)
            t0 = loop.time()
            for n, chunk in enumerate(tone(0.6)):
                await asyncio.sleep(max(0.0, t0 + n * 0.02 - loop.time()))
                await ws.send(chunk)

        frames = silent = utterance = 0
        speaking = False
        try:
            async for msg in ws:
                if isinstance(msg, str):
                    if json.loads(msg).get("type") == "stop":
                        break
                    continue
                frames += 1
                if path.startswith("/drop") and frames >= 25:
                    await ws.close(1011, "scripted")
                    return
                if path.startswith("/echo"):
                    tasks.append(asyncio.create_task(later(loop.time() + DELAY, msg)))
                elif path.startswith("/bot"):
                    loud = bool(np.any(decode(msg, "pcm_s16le") != 0))
                    silent = 0 if loud else silent + 1
                    speaking = speaking or loud
                    if speaking and silent >= 25:
                        speaking = False
                        tasks.append(asyncio.create_task(reply()))
                        utterance += 1
            for t in tasks:
                await t
            await ws.close()
        except ConnectionClosed:
            pass

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


def config(url: str, reply: bool) -> Any:
    from probe.session.core import SourceConfig

    if reply:
        return SourceConfig(target=url, duration_s=4.0, reply=True, utterance_s=1.5, gap_s=1.0,
                            drain_s=2.0)
    return SourceConfig(target=url, duration_s=2.0, drain_s=1.0)


class InlineStream:
    """The return direction's detection run right where the shell hands it audio."""

    def __init__(self, registry: Any, hop: str, audio: Any, session: str) -> None:
        from probe.aio.hopstream import HopStream

        self._s = HopStream(registry, hop, audio, session_hint=session)

    def feed(self, data: bytes, arrival: float) -> None:
        self._s.on_audio(data, arrival)

    def set_format(self, audio: Any) -> None:
        self._s.set_format(audio)

    def close(self) -> None:
        self._s.close()


def records(registry: Any, result_error: str | None) -> dict[str, Any]:
    """What a session left in the registry, in a form both shells can be compared by."""
    from probe.measure.registry import Measurement

    registry.settle_all()
    series = registry.series()
    replies, missed = registry.replies()
    return {
        "error": result_error,
        "sent": sorted({m.seq for m in series}),
        "detected": sorted(m.seq for m in series if isinstance(m, Measurement)),
        "latency_ms": sorted(round(m.latency_s * 1000, 1) for m in series
                             if isinstance(m, Measurement)),
        "replies_ms": sorted(round(r * 1000, 1) for r in replies),
        "replies_missed": missed,
    }


def _gevent(url: str, reply: bool) -> None:
    from gevent import monkey

    monkey.patch_all()
    from probe.locust.session import run_session
    from probe.measure.registry import SessionRegistry

    class Sink:
        def open_stream(self, hop: str, audio: Any, session: str) -> InlineStream:
            return InlineStream(engine.registry, hop, audio, session)

    class Engine:
        clock = staticmethod(time.time)
        registry = SessionRegistry(clock=time.time, marker_timeout=2.0)
        sink = Sink()

    engine = Engine()
    out = run_session(config(url, reply), engine, session="s-1")  # type: ignore[arg-type]
    print(json.dumps(records(engine.registry, out.error)))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(_serve())
    else:
        _gevent(sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "reply")
