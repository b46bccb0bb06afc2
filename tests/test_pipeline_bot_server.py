"""The reference pipeline's reply hop over real loopback sockets: a websockets client plays the
caller (probe dialect and Twilio), and the bot's reply, stop and clear are timed on arrival."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from probe.audio.formats import decode, encode
from probe.errors import ConfigError
from probe.measure.barge import BargeTracker
from probe.measure.conversation import Figure
from probe.measure.reply import ReplyTracker
from probe.pipeline import ReferencePipeline, format_hops, parse_hops
from probe.protocol import Audio, Clear, Mark, TwilioReturnReceiver, TwilioSender, parse_traceparent

FACTOR = float(os.environ.get("PROBE_TEST_TIMEOUT_FACTOR", "1"))
TIMEOUT = 5.0 * FACTOR
FRAME = 0.020
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ATTEMPTS = 5  # a loaded CI box can stall the loop for a while; timing checks retry
T = TypeVar("T")


def _run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout * FACTOR)

    return asyncio.run(bounded())


async def _sleep_until(deadline: float) -> None:
    if deadline - time.time() > 0.001:
        await asyncio.sleep(deadline - time.time() - 0.001)
    while time.time() < deadline:
        await asyncio.sleep(0)


def _caller(rate: int, total: float, speech: list[tuple[float, float]]) -> np.ndarray:
    """`total` seconds: a -20 dBFS chord in the `speech` spans (on the 20 ms grid), zeros else."""
    t = np.arange(round(total * rate)) / rate
    x = np.zeros(len(t), np.float32)
    for a, b in speech:
        on = (t >= a - 1e-9) & (t < b - 1e-9)
        y = sum(np.sin(2 * np.pi * f * t[on] + i) for i, f in enumerate((330, 810, 1500)))
        x[on] = (0.1 * math.sqrt(2 / 3) * np.asarray(y)).astype(np.float32)
    return x


@dataclass
class Call:
    """What the caller sent (send time of each frame) and got back (arrival, message)."""

    sends: list[float] = field(default_factory=list)
    returned: list[tuple[float, str | bytes]] = field(default_factory=list)
    close_code: int | None = None


async def _call(url: str, opening: list[str], frames: list[str | bytes], stop: str) -> Call:
    call = Call()
    async with connect(url, compression=None, close_timeout=TIMEOUT) as ws:

        async def read(ws: ClientConnection) -> None:
            try:
                async for message in ws:
                    call.returned.append((time.time(), message))
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(read(ws))
        for message in opening:
            await ws.send(message)
        base = time.time() + 0.05
        for i, frame in enumerate(frames):
            await _sleep_until(base + i * FRAME)
            call.sends.append(time.time())
            await ws.send(frame)
        await ws.send(stop)
        await asyncio.wait_for(reader, TIMEOUT * 3)  # the pipeline closes once it has drained
        call.close_code = ws.close_code
    return call


def _frames(x: np.ndarray, rate: int, enc: str) -> list[bytes]:
    n = round(rate * FRAME)
    return [encode(x[i:i + n], enc) for i in range(0, len(x), n)]  # type: ignore[arg-type]


def _probe_barge(blocks: list[tuple[float, np.ndarray]], rate: int, t0: float,
                 clear: float | None = None) -> dict[str, float]:
    """The probe's own barge-in figures (probe.measure.barge) for a barge-in sent at `t0`."""
    tracker = BargeTracker("s", expect_clear=clear is not None)
    out: list[object] = []
    barged = cleared = False
    for t, y in blocks:
        if t >= t0 and not barged:
            barged = True
            out += tracker.barge(t0, t0 + 0.5)
        if clear is not None and t >= clear and not cleared:
            cleared = True
            out += tracker.clear(clear)
        out += tracker.feed(y, rate, t)
    out += tracker.tick(blocks[-1][0] + 1.0) + tracker.close()
    return {f.name: f.latency_s for f in out
            if isinstance(f, Figure) and f.latency_s is not None}


def _silent_from(arrival: float, y: np.ndarray, rate: int) -> float:
    """When a returned block's sound ends: its arrival plus the samples up to its last non-zero."""
    nz = np.flatnonzero(y)
    return arrival + (0 if not len(nz) else int(nz[-1]) + 1) / rate


# --- spec ----------------------------------------------------------------------------------------


def test_reply_spec_parses_prints_and_refuses_mistakes() -> None:
    (a, b) = parse_hops("asr:20ms,bot:800ms:reply:stop=150ms:say=1.5s:talkover:noclear")
    assert a.reply is None and b.reply is not None
    assert (b.delay, b.reply.stop, b.reply.say) == (0.8, 0.15, 1.5)
    assert b.reply.talkover and not b.reply.clear
    assert format_hops([a, b]) == "asr:20ms,bot:800ms:reply:stop=150ms:say=1500ms:talkover:noclear"
    (c,) = parse_hops("bot:1s:reply")
    assert c.reply is not None and (c.reply.stop, c.reply.say) == (0.1, 2.0)
    assert c.to_spec() == "bot:1s:reply"
    for bad, words in [
        ("bot:1s:reply,tts:20ms", "must be the last hop"),
        ("bot:1s:stop=100ms", "belongs to a reply hop"),
        ("bot:1s:reply:mulaw8k", "takes only reply options"),
        ("bot:1s~10ms:reply", "takes only reply options"),
        ("bot:1s:reply:stop=abc", "not a duration"),
        ("bot:1s:reply:say=0", "say="),
        ("bot:1s:reply:talkover=1", "takes no value"),
        ("bot:1s:reply:reply", "twice"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_hops(bad)


# --- probe dialect --------------------------------------------------------------------------------


def _start(rate: int) -> str:
    return json.dumps({"type": "start", "session": "bot-1", "traceparent": TP,
                       "audio": {"encoding": "pcm_s16le", "sample_rate": rate, "channels": 1}})


def test_probe_dialect_reply_onset_and_barge_in_stop() -> None:
    # The caller speaks 0.2-1.0 s; asr adds 20 ms, the bot answers 600 ms after the end, so its
    # reply reaches the caller at 1.62 s; the caller barges in at 1.9 s (the bot hears it at
    # 1.92 s) and the bot stops 100 ms later, at 2.02 s; it answers that at 2.4 + 0.62 s.
    rate = 16000
    x = _caller(rate, 4.4, [(0.2, 1.0), (1.9, 2.4)])

    async def main() -> Call:
        async with ReferencePipeline("asr:20ms,bot:600ms:reply:stop=100ms:say=1s") as pipeline:
            assert pipeline.url is not None
            return await _call(pipeline.url, [_start(rate)], list(_frames(x, rate, "pcm_s16le")),
                               '{"type": "stop"}')

    for _ in range(ATTEMPTS):
        call = _run(main())
        blocks = [(t, decode(m, "pcm_s16le")) for t, m in call.returned if isinstance(m, bytes)]
        assert blocks and all(len(y) == 320 for _, y in blocks)
        send = call.sends
        end1, barge, end2 = send[50], send[95], send[120]  # the frames at 1.0, 1.9 and 2.4 s
        tracker = ReplyTracker()
        tracker.utterance_end("s", end1)
        tracker.utterance_end("s", end2)
        first_reply = [b for b in blocks if b[0] < barge + 0.3]
        second_reply = [b for b in blocks if b[0] >= barge + 0.3]
        for t, y in blocks:
            tracker.feed("s", y, rate, t)
        onsets = [lat - 0.62 for lat in tracker.latencies]
        stop_err = (_silent_from(*first_reply[-1], rate) - (barge + 0.02 + 0.1)
                    if first_reply else math.inf)
        figures = _probe_barge(blocks, rate, barge)
        probe_err = figures.get("barge_in", math.inf) - 0.12
        print(f"reply onsets {[f'{e * 1e3:+.3f} ms' for e in onsets]}, "
              f"stop {stop_err * 1e3:+.3f} ms, the probe's barge_in {probe_err * 1e3:+.3f} ms")
        if (len(onsets) == 2 and all(abs(e) < 0.002 for e in onsets) and abs(stop_err) < 0.003
                and -0.003 < probe_err < 0.013):
            break
    assert len(onsets) == 2 and all(abs(e) < 0.002 for e in onsets), onsets
    assert abs(stop_err) < 0.003, stop_err
    assert -0.003 < probe_err < 0.013, probe_err  # plus up to one of the probe's 10 ms frames
    assert len(second_reply) == 50
    assert call.returned[-1][1] == '{"type":"stop"}' and call.close_code == 1000


# --- Twilio ---------------------------------------------------------------------------------------


def test_twilio_reply_mark_clear_and_barge_in() -> None:
    # As above at 8 kHz mu-law, no hop before the bot: reply at 1.6 s, barge-in at 1.9 s,
    # stop 150 ms: mark reply-1 and clear at 2.05 s; reply-2 at 3.0 s, its mark 1 s later.
    rate = 8000
    x = _caller(rate, 4.4, [(0.2, 1.0), (1.9, 2.4)])

    async def main() -> Call:
        async with ReferencePipeline("bot:600ms:reply:stop=150ms:say=1s",
                                     dialect="twilio") as pipeline:
            assert pipeline.url is not None
            sender = TwilioSender("MZbot", "CAbot", "bot-2", parse_traceparent(TP))
            opening = [sender.connected(), sender.start()]
            frames: list[str | bytes] = [sender.media(f) for f in _frames(x, rate, "mulaw")]
            return await _call(pipeline.url, opening, frames, sender.stop())

    for _ in range(ATTEMPTS):
        call = _run(main())
        receiver = TwilioReturnReceiver("MZbot")
        events = [(t, e) for t, m in call.returned for e in receiver.receive_text(m)]
        kinds = [type(e).__name__ for _, e in events]
        send = call.sends
        end1, barge, end2 = send[50], send[95], send[120]
        media = [(t, decode(e.data, "mulaw")) for t, e in events if isinstance(e, Audio)]
        marks = [(t, e.name) for t, e in events if isinstance(e, Mark)]
        clears = [t for t, e in events if isinstance(e, Clear)]
        first = [m for m in media if m[0] < barge + 0.3]
        second = [m for m in media if m[0] > barge + 0.3]
        errs = {
            "onset1": first[0][0] - (end1 + 0.6) if first else math.inf,
            "stop": _silent_from(*first[-1], rate) - (barge + 0.15) if first else math.inf,
            "clear": clears[0] - (barge + 0.15) if clears else math.inf,
            "mark1": marks[0][0] - (barge + 0.15) if marks else math.inf,
            "onset2": second[0][0] - (end2 + 0.6) if second else math.inf,
            "mark2": marks[1][0] - (end2 + 0.6 + 0.98) if len(marks) > 1 else math.inf,
        }
        figures = _probe_barge(media, rate, barge, clears[0] if clears else None)
        errs["probe clear"] = figures.get("clear", math.inf) - 0.15
        probe_err = figures.get("barge_in", math.inf) - 0.15
        print("twilio bot: " + ", ".join(f"{k} {v * 1e3:+.3f} ms" for k, v in errs.items())
              + f", the probe's barge_in {probe_err * 1e3:+.3f} ms")
        if all(abs(v) < 0.003 for v in errs.values()) and -0.003 < probe_err < 0.013:
            break
    assert all(abs(v) < 0.003 for v in errs.values()), errs
    assert -0.003 < probe_err < 0.013, probe_err
    assert all(len(y) == 160 for _, y in media)
    assert [name for _, name in marks] == ["reply-1", "reply-2"]
    i = kinds.index("Mark")
    assert kinds[i - 1:i + 3] == ["Audio", "Mark", "Clear", "Audio"]
    assert kinds[-1] == "Mark" and len(clears) == 1
    assert len(second) == 50
    assert call.close_code == 1000


def test_twilio_talkover_and_noclear() -> None:
    rate = 8000
    x = _caller(rate, 3.6, [(0.2, 1.0), (1.5, 2.6)])

    async def main() -> Call:
        async with ReferencePipeline("bot:300ms:reply:stop=100ms:say=1s:talkover:noclear",
                                     dialect="twilio") as pipeline:
            assert pipeline.url is not None
            sender = TwilioSender("MZbot", "CAbot", "bot-3", parse_traceparent(TP))
            opening = [sender.connected(), sender.start()]
            frames: list[str | bytes] = [sender.media(f) for f in _frames(x, rate, "mulaw")]
            return await _call(pipeline.url, opening, frames, sender.stop())

    for _ in range(ATTEMPTS):
        call = _run(main())
        receiver = TwilioReturnReceiver("MZbot")
        events = [(t, e) for t, m in call.returned for e in receiver.receive_text(m)]
        barge = call.sends[75]
        media = [t for t, e in events if isinstance(e, Audio) and t < call.sends[130]]
        # Reply at 1.3 s, stopped at 1.6, back at 1.9 s while the caller speaks until 2.6 s.
        gaps = sorted(zip(media, media[1:], strict=False), key=lambda g: g[0] - g[1])[:1]
        err = gaps[0][1] - (barge + 0.1 + 0.3) if gaps else math.inf
        print(f"talkover: resumed {err * 1e3:+.3f} ms")
        if abs(err) < 0.003:
            break
    assert abs(err) < 0.003, gaps
    assert len(media) == 50  # the whole first reply, in two parts
    assert not [e for _, e in events if isinstance(e, Clear)]
    assert [e.name for _, e in events if isinstance(e, Mark)] == ["reply-1", "reply-2"]
