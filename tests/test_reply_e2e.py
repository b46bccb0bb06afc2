"""Reply latency against a real voice bot on loopback: it answers in its own voice, not an echo."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
from scripted_peer import tone
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig
from probe.audio.formats import decode

REPLY_DELAY = 0.3
# The bot decides an utterance ended after this many silent 20 ms frames (speech pauses in the
# fixture last up to 16 frames).
HANGOVER = 25
RATE = 16000


async def _bot(ws: ServerConnection, answer: set[int]) -> None:
    """Hears an utterance end (HANGOVER silent frames after speech) and answers each one in
    ``answer`` (by number, from 0) REPLY_DELAY later with a 0.6 s tone, paced in real time."""
    start = json.loads(await ws.recv())
    assert start["type"] == "start"
    speaking = False
    silent = 0
    utterance = 0
    tasks: list[asyncio.Task[None]] = []

    async def reply() -> None:
        await asyncio.sleep(REPLY_DELAY)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for n, chunk in enumerate(tone(0.6)):
            await asyncio.sleep(max(0.0, t0 + n * 0.02 - loop.time()))
            await ws.send(chunk)

    try:
        async for msg in ws:
            if isinstance(msg, str):
                if json.loads(msg).get("type") == "stop":
                    break
                continue
            loud = bool(np.any(decode(msg, "pcm_s16le") != 0))
            silent = 0 if loud else silent + 1
            if loud:
                speaking = True
            elif speaking and silent >= HANGOVER:
                speaking = False
                if utterance in answer:
                    tasks.append(asyncio.create_task(reply()))
                utterance += 1
        for t in tasks:
            await t
        await ws.close()
    except ConnectionClosed:
        pass


def _run(answer: set[int]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async def handler(ws: ServerConnection) -> None:
            await _bot(ws, answer)

        async with serve(handler, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            src = SourceConfig(
                target=f"ws://127.0.0.1:{port}/bot",
                duration_s=7.0,
                reply=True,
                utterance_s=2.0,
                gap_s=1.5,
                drain_s=1.0,
            )
            cfg = RunConfig(source=src, sessions=2, concurrency=2, use_sink=False,
                            marker_timeout_s=3.0)
            return await run_probe(cfg, clock=time.time)

    return asyncio.run(go())


def test_reply_latency_is_measured_from_utterance_end_to_reply_onset() -> None:
    report = _run({0, 1})
    reply = report["reply_ms"]
    # 2 sessions x 2 utterances, each answered.
    assert reply["count"] == 4, report
    assert report["reply_missed"] == 0
    # The first silent frame is sent at the utterance's end; the bot's 25th silent frame leaves
    # 24 frames (480 ms) later, and it answers 300 ms after that: 780 ms plus loopback transit.
    assert 780.0 <= reply["p50"] <= 795.0, reply
    assert reply["max"] <= 810.0, reply
    # A reply in the system's own voice is not the return hop: nothing is owed there.
    assert all(h["name"] != "return" for h in report["hops"])
    assert report["sessions"]["completed"] == 2


def test_an_unanswered_utterance_is_a_missed_reply() -> None:
    report = _run({0})
    assert report["reply_ms"]["count"] == 2
    assert report["reply_missed"] == 2
