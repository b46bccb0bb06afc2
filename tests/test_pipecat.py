"""probe.integrations.pipecat against a real Pipecat bot on loopback.

Pipecat pins packages the probe needs newer (protobuf<7, soxr~=1.0, soundfile~=0.13), so the bot
runs in its own environment: PROBE_PIPECAT_PYTHON (default /opt/probe-pipecat/bin/python, made by
.ci/run and by the README's command), with this repository on PYTHONPATH. Without it the tests
skip on a developer's machine and fail under CI=true.

- tests/pipecat_checks.py: the processor inside Pipecat's own test harness (frames pass
  unchanged, what the fork sends, every context source, a missing or dead sink).
- tests/pipecat_bot.py: a Twilio Media Streams bot (FastAPI transport, Twilio serializer) with
  taps at the transport input (``bot.in``) and before the transport output (``bot.out``). The
  probe CLI runs against it as a user would (``probe run --dialect twilio``), and a separate
  client times the echo of tone bursts to check the probe's return-direction figure. Its
  ``barge`` stage is a bot with Pipecat's own interruptions (Silero VAD, a user turn processor):
  ``probe run --reply --barge-in`` times how fast it stops talking and sends Twilio's ``clear``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SLOW
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from probe.audio.formats import decode, encode

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = "/opt/probe-pipecat/bin/python"
MAKE_VENV = (
    "python3 -m venv /opt/probe-pipecat && /opt/probe-pipecat/bin/pip install "
    "-r tests/pipecat-requirements.txt"
)

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture(scope="module")
def pipecat_python() -> str:
    """The Pipecat environment's interpreter, checked to import what the bot needs."""
    python = os.environ.get("PROBE_PIPECAT_PYTHON", DEFAULT_PYTHON)
    why = None
    if not Path(python).is_file():
        why = f"{python} does not exist"
    else:
        probe = subprocess.run(
            [python, "-c", "import pipecat, fastapi, uvicorn, websockets"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60 * SLOW,
        )
        if probe.returncode != 0:
            why = f"{python} cannot import pipecat, fastapi and uvicorn: {probe.stderr[-500:]}"
    if why is not None:
        message = f"Pipecat's environment is missing ({why}); make it with: {MAKE_VENV}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


class Bot:
    """tests/pipecat_bot.py in Pipecat's environment, on a loopback port."""

    def __init__(self, python: str, log: Path) -> None:
        self.log = log
        self._err = log.open("wb")
        self.proc = subprocess.Popen(
            [python, str(ROOT / "tests" / "pipecat_bot.py")],
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=_env(),
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60 * SLOW
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the Pipecat bot did not start: {self.stderr()}")
            line += self.proc.stdout.read1(1)  # type: ignore[attr-defined]
        self.port = int(line.split()[1])

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stderr(self) -> str:
        self._err.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10 * SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


@pytest.fixture(scope="module")
def bot(pipecat_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    b = Bot(pipecat_python, tmp_path_factory.mktemp("pipecat") / "bot.log")
    try:
        # One short call first: what a process does once (imports, first pipeline) is not timed.
        asyncio.run(_tone_onsets(b.url(f"/echo/{RATE}"), calls=1, seconds=1.5))
        yield b
    finally:
        b.stop()


def _probe_run(target: str, out: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """``probe run --dialect twilio`` from this environment, as a user runs it."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "probe.cli", "run", "--target", target, "--dialect", "twilio",
            "--sessions", "2", "--concurrency", "2", "--json", str(out), *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120 * SLOW,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout + proc.stderr


def test_the_processor_inside_pipecat_pipelines(pipecat_python: str) -> None:
    proc = subprocess.run(
        [pipecat_python, str(ROOT / "tests" / "pipecat_checks.py")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120 * SLOW,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert len([x for x in lines if x.startswith("ok ")]) == 7, proc.stdout


RATE = 8000
FRAME = 160  # 20 ms of Twilio's 8 kHz mu-law
ONSET = 0.1  # a tone sample above this (of full scale) is the onset; the tone peaks at 0.3


async def _tone_client(url: str, sink: str, seconds: float) -> list[float]:
    """One Twilio call of its own (no probe code on the way but the mu-law codec): 200 ms of
    1 kHz every 0.5 s from 0.5 s on (as the probe's markers), in 20 ms media events. Each event
    is stamped when it is handed to the socket and each event back when it is received; a
    burst's delay is the first echoed sample above ONSET against the first sent one, both
    placed in their events by offset / 8000 (PROTOCOL.md 4, the probe's own rule). Returns the
    delays in ms."""
    period, tone_frames = 25, 10
    t = np.arange(tone_frames * FRAME) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    k0 = int(np.argmax(np.abs(tone) > ONSET))
    silence = encode(np.zeros(FRAME, np.float32), "mulaw")
    burst = [encode(tone[i * FRAME : (i + 1) * FRAME], "mulaw") for i in range(tone_frames)]
    n_frames = int(seconds * 50)
    sid = "MZ" + uuid.uuid4().hex
    received: list[tuple[float, np.ndarray]] = []
    onsets_sent: list[float] = []
    async with connect(url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({
            "event": "start", "sequenceNumber": "1", "streamSid": sid,
            "start": {
                "streamSid": sid, "callSid": "CA" + uuid.uuid4().hex,
                "accountSid": "AC" + "0" * 32, "tracks": ["inbound"],
                # The taps fork to a sink as they do for the probe: the bot does the same work.
                "customParameters": {"sink": sink},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            },
        }))

        async def receive() -> None:
            async for msg in ws:
                now = time.time()
                obj = json.loads(msg)
                if obj.get("event") == "media":
                    pcm = decode(base64.b64decode(obj["media"]["payload"]), "mulaw")
                    received.append((now, pcm))

        rx = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.02
        for n in range(n_frames):
            await asyncio.sleep(max(0.0, t0 + n * 0.02 - loop.time()))
            k = n % period
            payload = burst[k] if k < tone_frames and period <= n <= n_frames - period else silence
            media = {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20),
                     "payload": base64.b64encode(payload).decode()}
            text = json.dumps({"event": "media", "streamSid": sid, "media": media})
            sent_at = time.time()
            await ws.send(text)
            if k == 0 and period <= n and n + period <= n_frames:
                onsets_sent.append(sent_at + k0 / RATE)
        await asyncio.sleep(0.3)
        rx.cancel()
    times = np.concatenate([at + np.arange(len(x)) / RATE for at, x in received])
    samples = np.concatenate([x for _, x in received])
    delays = []
    for sent in onsets_sent:
        loud = np.nonzero((times > sent) & (times < sent + 0.4) & (np.abs(samples) > ONSET))[0]
        if len(loud):
            delays.append(float(times[loud[0]] - sent) * 1000.0)
    return delays


async def _tone_onsets(url: str, calls: int, seconds: float) -> list[float]:
    """``calls`` tone clients at once (the probe run's shape: its sessions at once), with a
    sink that takes the bot's forks and drops them."""

    async def drain(ws: ServerConnection) -> None:
        async for _ in ws:
            pass

    async with serve(drain, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        sink = f"ws://127.0.0.1:{port}/sink"
        runs = await asyncio.gather(*(_tone_client(url, sink, seconds) for _ in range(calls)))
    return [d for run in runs for d in run]


def _hops(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in report["hops"]}


def test_probe_run_reports_every_tapped_hop_and_the_return_matches_tone_onsets(
    bot: Bot, tmp_path: Path
) -> None:
    """The probe's p50 of the return direction against the median echo delay of tone bursts
    timed by a separate client, each over two 6 s calls at once.

    The two measure different calls, and a Pipecat call's echo delay is its own: the output
    transport paces what it sends at one chunk per 40 ms, so after any stall of the bot's event
    loop, or a burst from a sender that stalled, the chunks that piled up stay behind for the
    rest of the call (docs/pipecat.md; seen here under other load as one call in eight going
    from 21 ms to 45-75 ms). So the pair is measured up to three times, until one attempt agrees
    within 2 ms; every attempt's figures are printed, and all of them are in the failure."""
    attempts: list[str] = []
    for attempt in range(3):
        report, table = _probe_run(
            bot.url(f"/echo/{RATE}"), tmp_path / f"echo{attempt}.json", "--duration", "6",
            "--marker-timeout", "6", "--hop-order", "bot.in,bot.out,return",
        )
        print(table)
        assert report["sessions"]["completed"] == 2, report["sessions"]
        hops = _hops(report)
        assert list(hops) == ["bot.in", "bot.out", "return"], bot.stderr()
        for name, h in hops.items():
            m = h["markers"]
            assert m["sent"] == m["detected"] > 0, (name, m, bot.stderr())
            assert h["errors"] == [], (name, h["errors"])
        # The echo stage adds nothing between the two taps.
        assert hops["bot.out"]["own_latency_ms"]["p50"] < 5.0, hops["bot.out"]

        delays = asyncio.run(_tone_onsets(bot.url(f"/echo/{RATE}"), calls=2, seconds=6.0))
        assert len(delays) == 2 * 11, delays
        probe_p50 = hops["return"]["latency_ms"]["p50"]
        tone_p50 = statistics.median(delays)
        attempts.append(
            f"probe {probe_p50:.2f} ms (send lag max {report['send_lag_ms']['max']:.1f} ms), "
            f"tone onsets {tone_p50:.2f} ms (n={len(delays)}, "
            f"{min(delays):.2f}-{max(delays):.2f})"
        )
        print(f"return p50, attempt {attempt + 1}: {attempts[-1]}")
        if abs(probe_p50 - tone_p50) <= 2.0:
            break
    else:
        pytest.fail("the return p50 and the tone onsets never agreed within 2 ms: "
                    + "; ".join(attempts))
    # The output transport writes 40 ms chunks: the first half of each waits one 20 ms frame
    # for the second, so the echo comes back about one frame late.
    assert 15.0 < probe_p50 < 40.0, attempts


def test_the_forks_state_the_pipelines_own_rate(bot: Bot, tmp_path: Path) -> None:
    """At 16 kHz (Pipecat's default) the serializer resamples both ways; the taps' forks say
    16000 Hz pcm16, and the sink finds every marker in them."""
    report, table = _probe_run(
        bot.url("/echo/16000"), tmp_path / "echo16.json", "--duration", "6",
        "--marker-timeout", "6", "--hop-order", "bot.in,bot.out,return",
    )
    print(table)
    hops = _hops(report)
    assert list(hops) == ["bot.in", "bot.out", "return"], bot.stderr()
    for name, h in hops.items():
        m = h["markers"]
        assert m["sent"] == m["detected"] > 0, (name, m, bot.stderr())
    assert hops["bot.out"]["own_latency_ms"]["p50"] < 5.0, hops["bot.out"]
    # Read at the wrong rate, a fork would time every marker wrong by about its own offset.
    assert hops["bot.in"]["latency_ms"]["p50"] < hops["return"]["latency_ms"]["p50"]


def test_reply_mode_through_the_pipecat_bot(bot: Bot, tmp_path: Path) -> None:
    """The bot answers each utterance with a tone (its own voice) 300 ms after it heard 25
    silent frames: reply latency is about 780 ms; the input tap carries the markers, and the
    output tap carries the bot's voice, where no marker can be found."""
    report, table = _probe_run(
        bot.url(f"/reply/{RATE}"), tmp_path / "reply.json", "--reply", "--utterance", "2",
        "--gap", "1.5", "--duration", "7", "--marker-timeout", "6",
        "--hop-order", "bot.in,bot.out",
    )
    print(table)
    assert report["reply_ms"]["count"] == 4, report["reply_ms"]
    assert report["reply_missed"] == 0
    assert 780.0 <= report["reply_ms"]["p50"] <= 820.0, report["reply_ms"]
    hops = _hops(report)
    assert list(hops) == ["bot.in", "bot.out"], bot.stderr()
    inp, out = hops["bot.in"]["markers"], hops["bot.out"]["markers"]
    assert inp["sent"] == inp["detected"] > 0, inp
    # Not found: missed, or unmeasured where the probe itself was overloaded meanwhile (its
    # health guard, docs/report.md), as happens on this shared machine under other load.
    assert out["detected"] == 0, out
    assert out["sent"] == out["missed"] + out["unmeasured"] == inp["sent"], (
        out, report["generator"],
    )


# Silero's start_secs: Pipecat interrupts only after this much speech, so nothing faster is real.
VAD_START_MS = 200.0
# Measured here: 344-362 ms at the median (the test's docstring), at load average 9-13.
BARGE_P50_MS = 450.0
# The bot's reply is 2 s of tone and the probe barges in 0.5 s into it: a bot that never
# stopped would fall silent 1.5 s after the barge-in, so the bound must stay below that.
BARGE_BOUND_MS = min(BARGE_P50_MS * SLOW, 1200.0)


def _barge_problems(report: dict[str, Any], text: str, bot_log: str) -> list[str]:
    conv = report["conversation"]
    barge, clear = conv["barge_in"], conv["clear"]
    b50, c50 = barge["latency_ms"]["p50"], clear["latency_ms"]["p50"]
    checks = {
        "both sessions completed": report["sessions"]["completed"] == 2,
        "each session barged in": barge["attempts"] >= 2,
        "every barge-in timed": barge["latency_ms"]["count"] == barge["attempts"]
        and barge["missed"] == 0,
        "every barge-in cleared": clear["latency_ms"]["count"] == barge["attempts"]
        and clear["missed"] == 0,
        f"barge_in p50 in [{VAD_START_MS:.0f}, {BARGE_BOUND_MS:.0f}] ms": b50 is not None
        and VAD_START_MS <= b50 <= BARGE_BOUND_MS,
        f"clear p50 in [{VAD_START_MS:.0f}, {BARGE_BOUND_MS:.0f}] ms": c50 is not None
        and VAD_START_MS <= c50 <= BARGE_BOUND_MS,
        # The clear drops what the phone has queued: the bot is silent from it on, or from the
        # end of the one 40 ms chunk the output transport may have been writing.
        "silent by the clear": b50 is not None and c50 is not None and b50 <= c50 + 45.0,
        "never talked over": barge["talked_over"] == 0,
        "no traceback": "Traceback" not in text and "Traceback" not in bot_log,
    }
    return [name for name, ok in checks.items() if not ok]


def test_barge_in_through_a_pipecat_bot_with_interruptions(bot: Bot, tmp_path: Path) -> None:
    """``probe run --dialect twilio --reply --barge-in 0.5`` against the ``barge`` stage: Silero
    VAD and Pipecat's user turn processor broadcast an ``InterruptionFrame`` when the caller
    starts speaking; the output transport drops the reply it has queued and the Twilio
    serializer sends ``clear``. Each session speaks 2 s, waits 3 s (the bot answers about 0.9 s
    after the speech ends: VAD stop 0.2 s, then the 0.6 s turn timeout), and barges in 0.5 s into
    the bot's 2 s tone with 1 s of speech, twice in 10 s; the bot's answer to the barge-in is cut
    short by the next utterance, before the probe would barge in on it.

    Measured here (five runs, load average 9-13 from other users' soak runs): barge_in p50
    344-362 ms (p95 up to 432 ms), clear the same (the clear cuts the queued audio, so the bot
    falls silent on the phone when the clear arrives); a separate Twilio client saw the clear
    340-370 ms after its own barge-in speech began. That is Silero's 0.2 s of confirmed speech, 6-7
    windows of 32 ms, after its volume gate (loudness over 400 ms, smoothed, at least 0.6) has
    opened, which takes another 50-150 ms from digital silence: with the volume gate off the same
    runs gave 245-323 ms. The bound is 450 ms at the median (scaled by the test-timeout factor,
    but kept below the 1.5 s a bot that never stopped would show), and never under the 200 ms
    Pipecat waits for.

    Where the probe itself was overloaded (its send lag past its bounds, report ``generator``),
    a stall of a second inside the barge-in makes Pipecat hear the caller stop and answer over
    the rest of it: such an attempt is run again, up to three; an attempt that fails while the
    probe kept time fails the test. Every attempt's figures are printed and in the failure."""
    attempts: list[str] = []
    for attempt in range(3):
        report, text = _probe_run(
            bot.url(f"/barge/{RATE}"), tmp_path / f"barge{attempt}.json", "--reply",
            "--barge-in", "0.5", "--utterance", "2", "--gap", "3", "--duration", "10",
            "--marker-timeout", "6", "--hop-order", "bot.in,bot.out",
        )
        print(text)
        conv = report["conversation"]
        overloaded = bool(report["generator"]["overloaded"])
        problems = _barge_problems(report, text, bot.stderr())
        attempts.append(
            f"attempt {attempt + 1}: barge_in {conv['barge_in']}, clear {conv['clear']}, "
            f"reply {report['reply_ms']} missed {report['reply_missed']}, send lag "
            f"{report['send_lag_ms']}, overloaded {overloaded}: "
            + ("ok" if not problems else "failed " + ", ".join(problems))
        )
        print(attempts[-1])
        if not problems:
            break
        if not overloaded:
            pytest.fail("\n".join(attempts) + "\n" + bot.stderr())
    else:
        pytest.fail("\n".join(attempts) + "\n" + bot.stderr())
