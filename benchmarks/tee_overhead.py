"""What ``probe tee`` adds: round-trip latency and CPU at N paced streams, beside a direct
connection to the same echo upstream, in one run.

Four processes on loopback, each its own: an echo upstream (sends every message back), the tee
(``probe tee``, as a user runs it), a discard sink (reads the forks and counts them) and this
client. The client opens ``--streams`` connections, sends a probe-dialect ``start`` and then a
20 ms frame of 16 kHz pcm16 every 20 ms per stream on an absolute schedule (streams spread across
the frame period), and times each frame's echo (round trip: client -> [tee ->] echo -> [tee ->]
client). Phases, each ``--seconds`` long, alternate ``--rounds`` times so that drift in the
machine's load falls on all of them:

- ``direct``: the client connects to the echo upstream;
- ``tee``: through the tee, starts naming no sink (relay only, nothing forked);
- ``tee+forks``: through the tee, starts naming the discard sink, so each stream is forked both
  ways (hops ``tee`` and ``tee.return``): two fork connections and two more frames per frame.

Printed per phase: one-way latency client -> upstream p50/p99 (``up``: the echo stamps each frame
on arrival with CLOCK_MONOTONIC, which every process of a host shares), round-trip
p50/p90/p99/max (ms), the client's send lag p99 (did the generator
keep up), the CPU of the tee and of the echo (share of one core, and ms of CPU per stream-second),
the frames the sink received; then the latency the tee adds (phase minus direct) and the ratios.

    python benchmarks/tee_overhead.py [--streams 100] [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil

FRAME_S = 0.02
FRAME_BYTES = 640  # 20 ms of 16 kHz pcm16
WARMUP_S = 1.0
AUDIO = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}

ECHO = r"""
import asyncio, contextlib, sys
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from probe.aio.loop import run
import time
async def echo(ws):
    with contextlib.suppress(ConnectionClosed):
        async for m in ws:
            if isinstance(m, bytes) and len(m) >= 16:
                # when the frame reached the upstream (CLOCK_MONOTONIC: one clock per host)
                m = m[:8] + time.monotonic_ns().to_bytes(8, "big") + m[16:]
            await ws.send(m)
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()
run(main())
"""

DISCARD = r"""
import asyncio, signal, sys
from websockets.asyncio.server import serve
from probe.aio.loop import run
frames = 0
conns = 0
async def sink(ws):
    global frames, conns
    conns += 1
    async for m in ws:
        frames += 1
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(sink, "127.0.0.1", int(sys.argv[1]), compression=None, max_size=None):
        print("ready", flush=True)
        await stop.wait()
    print(f"{conns} {frames}", flush=True)
run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


@dataclass
class Phase:
    name: str
    rtt: list[float] = field(default_factory=list)
    oneway: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tee_cpu: float = 0.0
    echo_cpu: float = 0.0
    sink_frames: int = 0
    lost: int = 0


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


async def stream(url: str, i: int, n: int, sink: str | None, base: float, seconds: float,
                 phase: Phase) -> None:
    from websockets.asyncio.client import connect

    start: dict[str, object] = {"type": "start", "session": f"bench-{i}",
                                "traceparent": f"00-{'ab' * 16}-{i + 1:016x}-01", "audio": AUDIO}
    if sink is not None:
        start["sink"] = sink
    sent: dict[int, float] = {}
    frames = int(seconds / FRAME_S)
    async with connect(url, compression=None, max_size=None) as ws:
        await ws.send(json.dumps(start))
        await ws.recv()  # the echo of the start

        async def receive() -> None:
            got = 0
            async for m in ws:
                t = time.perf_counter()
                if isinstance(m, bytes):
                    seq = int.from_bytes(m[:4], "big")
                    t0 = sent.pop(seq, None)
                    if t0 is not None and seq * FRAME_S >= WARMUP_S:
                        phase.rtt.append(t - t0)
                        sent_ns = int.from_bytes(m[4:8] + m[16:20], "big")
                        phase.oneway.append((int.from_bytes(m[8:16], "big") - sent_ns) / 1e9)
                    got += 1
                    if got == frames:
                        return

        rx = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        offset = (i / n) * FRAME_S
        payload = bytearray(FRAME_BYTES)  # seq, send time (split), the echo's arrival stamp
        for k in range(frames):
            due = base + offset + k * FRAME_S
            d = due - loop.time()
            if d > 0:
                await asyncio.sleep(d)
            payload[:4] = k.to_bytes(4, "big")
            ns = time.monotonic_ns().to_bytes(8, "big")
            payload[4:8], payload[16:20] = ns[:4], ns[4:]
            sent[k] = time.perf_counter()
            phase.lag.append(loop.time() - due)
            await ws.send(bytes(payload))
        try:
            await asyncio.wait_for(rx, 5.0)
        except TimeoutError:
            phase.lost += len(sent)
        await ws.send('{"type": "stop"}')


async def run_phase(url: str, n: int, sink: str | None, seconds: float, phase: Phase,
                    tee: psutil.Process, echo: psutil.Process) -> None:
    loop = asyncio.get_running_loop()
    base = loop.time() + 0.5
    tee0, echo0, t0 = cpu_s(tee), cpu_s(echo), time.monotonic()
    await asyncio.gather(*(stream(url, i, n, sink, base, seconds, phase) for i in range(n)))
    phase.seconds += time.monotonic() - t0
    phase.tee_cpu += cpu_s(tee) - tee0
    phase.echo_cpu += cpu_s(echo) - echo0


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000.0 if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()

    env = {**os.environ, "PROBE_LOG_LEVEL": "WARNING"}
    echo_port, tee_port, sink_port = free_port(), free_port(), free_port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(echo_port)],
                            stdout=subprocess.PIPE, text=True, env=env)
    sink = subprocess.Popen([sys.executable, "-c", DISCARD, str(sink_port)],
                            stdout=subprocess.PIPE, text=True, env=env)
    tee = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "tee", "--listen", f"127.0.0.1:{tee_port}",
         "--upstream", f"ws://127.0.0.1:{echo_port}/", "--hop", "tee"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    phases = {name: Phase(name) for name in ("direct", "tee", "tee+forks")}
    sink_url = f"ws://127.0.0.1:{sink_port}/sink"
    try:
        for port in (echo_port, tee_port, sink_port):
            wait_port(port)
        tee_p, echo_p = psutil.Process(tee.pid), psutil.Process(echo.pid)

        async def go() -> None:
            for _ in range(a.rounds):
                for name, url, fork in (
                    ("direct", f"ws://127.0.0.1:{echo_port}/", None),
                    ("tee", f"ws://127.0.0.1:{tee_port}/", None),
                    ("tee+forks", f"ws://127.0.0.1:{tee_port}/", sink_url),
                ):
                    await run_phase(url, a.streams, fork, a.seconds, phases[name], tee_p, echo_p)
                    await asyncio.sleep(1.0)

        from probe.aio.loop import run

        run(go())
    finally:
        for p in (tee, sink, echo):
            p.send_signal(signal.SIGTERM)
        for p in (tee, sink, echo):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    sink_out = (sink.stdout.read() if sink.stdout else "").split()
    tee_err = tee.stderr.read() if tee.stderr else ""
    forked = int(sink_out[-1]) if sink_out else 0

    print(f"tee overhead: {a.streams} streams of 20 ms frames (16 kHz pcm16), {a.seconds:g} s "
          f"per phase x {a.rounds} rounds, loopback, {os.cpu_count()} cores; client, tee, echo "
          "and sink each in their own process")
    print(f"{'phase':<10} {'up p50':>7} {'p99':>6} {'rtt p50':>8} {'p90':>6} {'p99':>6} "
          f"{'max':>7} {'lag p99':>8} {'tee CPU':>8} {'tee ms/str-s':>12} {'echo CPU':>8} "
          f"{'lost':>5}")
    stream_s = {k: p.seconds * a.streams for k, p in phases.items()}
    for name, p in phases.items():
        tee_share = p.tee_cpu / p.seconds
        print(f"{name:<10} {pct(p.oneway, .5):7.3f} {pct(p.oneway, .99):6.3f} "
              f"{pct(p.rtt, .5):8.3f} {pct(p.rtt, .9):6.3f} {pct(p.rtt, .99):6.3f} "
              f"{pct(p.rtt, 1.0):7.2f} {pct(p.lag, .99):8.3f} {tee_share:7.1%} "
              f"{p.tee_cpu * 1000 / stream_s[name]:12.3f} {p.echo_cpu / p.seconds:7.1%} "
              f"{p.lost:5d}")
    d = phases["direct"]
    for name in ("tee", "tee+forks"):
        p = phases[name]
        up50 = pct(p.oneway, .5) - pct(d.oneway, .5)
        up99 = pct(p.oneway, .99) - pct(d.oneway, .99)
        add50 = pct(p.rtt, .5) - pct(d.rtt, .5)
        add99 = pct(p.rtt, .99) - pct(d.rtt, .99)
        print(f"added by {name:<9}: one way (client -> upstream, one relay) p50 {up50:+.3f} ms, "
              f"p99 {up99:+.3f} ms; round trip (two relays) p50 {add50:+.3f} ms, p99 "
              f"{add99:+.3f} ms; ratio p50 {pct(p.rtt, .5) / pct(d.rtt, .5):.2f}x, p99 "
              f"{pct(p.rtt, .99) / pct(d.rtt, .99):.2f}x")
    worst = max(pct(p.lag, .99) for p in phases.values())
    if worst > 5.0:
        print(f"WARNING: the client's send lag reached p99 {worst:.1f} ms: this machine was "
              "overloaded during the run (other load?), so these figures are not the tee's; "
              "run again on a quieter machine")
    expect = int(2 * a.streams * (a.seconds / FRAME_S) * a.rounds)
    print(f"fork frames at the sink: {forked} (expected about {expect} audio frames plus "
          f"start/stop); median rtt samples per phase "
          f"{statistics.median(len(p.rtt) for p in phases.values()):.0f}")
    last = [line for line in tee_err.splitlines() if "stopped after" in line]
    if last:
        print(last[-1])


if __name__ == "__main__":
    main()
