"""What a probe.tap fork costs the host: time inside ``write`` and CPU per written frame.

A host process paces ``--streams`` streams of 20 ms frames (16 kHz pcm16, 640 bytes) on an
absolute schedule, each stream writing every frame to its own tap, forked to a discard sink in
another process (it reads and counts the frames). The same pacing loop runs without taps as the
baseline, in alternating rounds, so the difference is what the taps cost:

- ``write`` p50/p99/max: wall time of one ``write`` call, what the host's audio path waits;
- CPU per frame: the host process's CPU (every thread: the tap's sending included) minus the
  baseline's, over the frames written; and as a share of one core at this load.

Flavours: ``Tap`` on the host's own asyncio loop, ``BlockingTap`` from a pacing thread (its
frames are sent by the taps' shared background loop thread).

    python benchmarks/tap_cost.py [--streams 100] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

FRAME_S = 0.02
FRAME = bytes(640)
AUDIO = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}
TRACE = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"

DISCARD = r"""
import asyncio, signal, sys
from websockets.asyncio.server import serve
from probe.aio.loop import run
frames = 0
async def sink(ws):
    global frames
    async for m in ws:
        frames += 1
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(sink, "127.0.0.1", int(sys.argv[1]), compression=None):
        print("ready", flush=True)
        await stop.wait()
    print(frames, flush=True)
run(main())
"""


@dataclass
class Result:
    cpu: float = 0.0
    wall: float = 0.0
    frames: int = 0
    write_s: list[float] = field(default_factory=list)
    dropped: int = 0


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e6 if s else float("nan")


async def aio_round(url: str | None, n: int, seconds: float, res: Result) -> None:
    from probe.tap import Tap

    taps = [Tap(url, hop="bench") for _ in range(n)] if url else []
    for i, tap in enumerate(taps):
        tap.open(f"s{i}", TRACE, AUDIO)
    await asyncio.sleep(0.5)  # connected
    loop = asyncio.get_running_loop()
    frames = int(seconds / FRAME_S)
    perf = time.perf_counter
    cpu0, wall0 = time.process_time(), perf()
    base = loop.time()
    for k in range(frames):
        d = base + k * FRAME_S - loop.time()
        if d > 0:
            await asyncio.sleep(d)
        for tap in taps:
            t = perf()
            tap.write(FRAME)
            res.write_s.append(perf() - t)
        res.frames += len(taps)
    await asyncio.sleep(0.1)  # the last frames sent
    res.cpu += time.process_time() - cpu0
    res.wall += perf() - wall0
    for tap in taps:
        res.dropped += tap.stats.dropped
        tap.close()
    for tap in taps:
        await tap.wait_closed(5.0)


def thread_round(url: str | None, n: int, seconds: float, res: Result) -> None:
    from probe.tap import BlockingTap

    taps = [BlockingTap(url, hop="bench") for _ in range(n)] if url else []
    for i, tap in enumerate(taps):
        tap.open(f"s{i}", TRACE, AUDIO)
    time.sleep(0.5)
    frames = int(seconds / FRAME_S)
    perf = time.perf_counter

    def pace() -> None:
        base = time.monotonic()
        for k in range(frames):
            d = base + k * FRAME_S - time.monotonic()
            if d > 0:
                time.sleep(d)
            for tap in taps:
                t = perf()
                tap.write(FRAME)
                res.write_s.append(perf() - t)
            res.frames += len(taps)

    cpu0, wall0 = time.process_time(), perf()
    th = threading.Thread(target=pace)
    th.start()
    th.join()
    time.sleep(0.1)
    res.cpu += time.process_time() - cpu0
    res.wall += perf() - wall0
    for tap in taps:
        res.dropped += tap.stats.dropped
        tap.close()
    for tap in taps:
        tap.wait_closed(5.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = subprocess.Popen([sys.executable, "-c", DISCARD, str(port)], stdout=subprocess.PIPE,
                            text=True)
    assert sink.stdout is not None
    sink.stdout.readline()
    url = f"ws://127.0.0.1:{port}/sink"
    results = {k: Result() for k in ("asyncio, no tap", "Tap", "thread, no tap", "BlockingTap")}
    from probe.aio.loop import run

    try:
        for _ in range(a.rounds):
            run(aio_round(None, a.streams, a.seconds, results["asyncio, no tap"]))
            run(aio_round(url, a.streams, a.seconds, results["Tap"]))
            thread_round(None, a.streams, a.seconds, results["thread, no tap"])
            thread_round(url, a.streams, a.seconds, results["BlockingTap"])
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(15)
    received = int(sink.stdout.read().split()[-1])

    print(f"tap cost: {a.streams} streams of 20 ms frames (640 bytes), {a.seconds:g} s x "
          f"{a.rounds} rounds, forks to a discard sink in another process, loopback, "
          f"{os.cpu_count()} cores")
    print(f"{'host loop':<16} {'CPU share':>9} {'CPU us/frame':>12} {'write p50 us':>12} "
          f"{'p99 us':>7} {'max us':>8} {'dropped':>7}")
    for name, base in (("Tap", "asyncio, no tap"), ("BlockingTap", "thread, no tap")):
        for key in (base, name):
            r = results[key]
            extra = ""
            if key == name:
                b = results[base]
                per = (r.cpu / r.wall - b.cpu / b.wall) * r.wall / max(1, r.frames) * 1e6
                extra = f"{per:12.1f}"
            else:
                extra = f"{'-':>12}"
            if key == name:
                writes = (f"{pct(r.write_s, .5):12.1f} {pct(r.write_s, .99):7.1f} "
                          f"{pct(r.write_s, 1.0):8.0f} {r.dropped:7d}")
            else:
                writes = f"{'-':>12} {'-':>7} {'-':>8} {'-':>7}"
            print(f"{key:<16} {r.cpu / r.wall:9.1%} {extra} {writes}")
    written = results["Tap"].frames + results["BlockingTap"].frames
    print(f"frames written through taps: {written}; frames at the sink: {received} "
          f"(audio plus one start and one stop per stream and round)")


if __name__ == "__main__":
    main()
