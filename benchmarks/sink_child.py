"""CPU of the sink child per stream-second, side by side: its event loop on uvloop or on asyncio's.

The sink child (``python -m probe.aio.sinkproc``, what ``probe run`` and every Locust worker
start) receives each session's fork over a WebSocket and its return audio from the parent over
the socket pair, and detects every marker of both. This benchmark gives it exactly that load, and
nothing else on the machine competes with it from this benchmark:

- a client process opens ``--streams`` fork connections (hop ``a``) and sends each session's
  marked audio in 20 ms frames of 16 kHz pcm16 on an absolute schedule;
- this process feeds the same sessions' audio as the return direction (``open_stream``) on the
  same schedule, and records each marker's send, so the child's informed detection looks for it.

Per variant and round it prints the child's CPU per stream-second and the markers detected out
of those sent. The variants alternate
(``--rounds``), so drift in the machine's load falls on both. ``--before DIR`` compares code
instead (both on uvloop): the child run from the ``probe`` package of another checkout (e.g. a
``git worktree`` of the last commit) against this one's.

    python benchmarks/sink_child.py [--streams 100] [--hold 15] [--rounds 2] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from probe.aio import sinkproc
from probe.aio.sinkproc import SinkProcess
from probe.measure.health import GeneratorHealth
from probe.measure.registry import SessionRegistry
from probe.protocol import AudioFormat
from probe.session.core import SessionCore, SourceConfig, new_trace_context
from probe.watermark.design import session_payload

FIXTURE = "speech_en_scotland"
SESSION_S = 20.0
FRAME_S = 0.02

CLIENT = r"""
import asyncio, json, sys, time
from websockets.asyncio.client import connect
from probe.aio.loop import run
from probe.session.core import SessionCore, SourceConfig, new_trace_context
from probe.watermark.design import session_payload
url, base, n, fixture = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dur = float(sys.argv[5])
tokens = [int(t) for t in sys.argv[6].split(",")]
cfg = SourceConfig(target="ws://unused/", fixture=fixture, duration_s=dur)
async def one(i):
    core = SessionCore(cfg, f"s{i}", new_trace_context(),
                       lambda k, t=tokens[i]: session_payload(t, k & 255))
    async with connect(url, compression=None, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "start", "hop": "a", "session": f"s{i}",
            "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}}))
        offset = i * 0.02 / n
        for k in range(core.n_frames):
            d = base + offset + k * 0.02 - time.time()
            if d > 0:
                await asyncio.sleep(d)
            await ws.send(core.message(k))
        await ws.send('{"type": "stop"}')
async def main():
    await asyncio.gather(*(one(i) for i in range(n)))
run(main())
"""


_own_root = sinkproc._import_root


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_round(
    variant: str, streams: int, hold_s: float, only: str | None = None, root: str | None = None
) -> str:
    os.environ["PROBE_UVLOOP"] = "0" if variant == "asyncio" else "1"
    # The child imports probe from ``root`` (another checkout) when given, else from this one.
    sinkproc._import_root = (lambda: root) if root else _own_root  # type: ignore[assignment]
    health = GeneratorHealth()
    registry = SessionRegistry(clock=time.time, health=health)
    sink = SinkProcess(registry)
    # ``python -m`` puts the working directory first on the child's path: start it in ``root``.
    here = os.getcwd()
    if root:
        os.chdir(root)
    try:
        url = await sink.start("127.0.0.1", 0)
    finally:
        os.chdir(here)
    registry.add_send_listener(sink.expect)
    cfg = SourceConfig(target="ws://unused/", fixture=FIXTURE, duration_s=SESSION_S)
    pid = sink._proc.pid if sink._proc is not None else 0
    rss0 = _rss_mib(pid)
    cores, tokens = [], []
    for i in range(streams):
        token = registry.open_session(f"s{i}")
        tokens.append(token)
        cores.append(SessionCore(cfg, f"s{i}", new_trace_context(),
                                 lambda k, t=token: session_payload(t, k & 255)))
        if only != "return":
            registry.hop_connected("a", f"s{i}")
        if only != "fork":
            registry.hop_connected("return", f"s{i}")
    base = time.time() + 2.0
    client = None if only == "return" else subprocess.Popen(
        [sys.executable, "-c", CLIENT, url, repr(base), str(streams), FIXTURE, str(SESSION_S),
         ",".join(map(str, tokens))]
    )
    fmt = AudioFormat("pcm_s16le", 16000, 1)
    rets = (
        [] if only == "fork" else [sink.open_stream("return", fmt, f"s{i}") for i in range(streams)]
    )
    n_frames = cores[0].n_frames
    window = (2.0 + 2.0, 2.0 + 2.0 + hold_s)  # seconds after base-2
    cpu0 = t0 = 0.0
    for k in range(n_frames):
        for i, core in enumerate(cores):
            due = base + i * FRAME_S / streams + k * FRAME_S
            d = due - time.time()
            if d > 0:
                await asyncio.sleep(d)
            sent = core.sent(k, due, 0.0)
            for idx, at in sent.markers:
                registry.record_send(core.session, idx, at)
            if rets:
                rets[i].feed(core.message(k), due + 0.02)  # type: ignore[arg-type]
        elapsed = time.time() - (base - 2.0)
        if not t0 and elapsed >= window[0]:
            cpu0, t0 = _cpu_s(pid), time.monotonic()
        if t0 and elapsed >= window[1]:
            break
    wall = time.monotonic() - t0
    cpu = _cpu_s(pid) - cpu0
    rss = _rss_mib(pid)
    for r in rets:
        r.close()
    if client is not None:
        client.wait(timeout=SESSION_S + 30)
    await asyncio.sleep(4.0)
    await asyncio.to_thread(sink.drain, 30.0)
    registry.expire()
    counts = registry.hop_counts()
    await sink.stop()
    sent = sum(c.sent for c in counts.values())
    found = sum(c.detected for c in counts.values())
    what = {"fork": "forks only", "return": "return only"}.get(only or "", "")
    return (f"  {variant:8s} {what:12s}: sink child {1000 * cpu / wall / streams:5.2f} ms CPU per "
            f"stream-second ({100 * cpu / wall:4.0f} % of a core at {streams} streams); "
            f"RSS {rss0:.0f} -> {rss:.0f} MiB ({(rss - rss0) / streams:.2f} MiB per stream); "
            f"markers detected {found}/{sent}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--hold", type=float, default=12.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before", default=None, metavar="DIR",
                    help="compare the child run from DIR's probe package (before) with this one's")
    ap.add_argument("--parts", action="store_true",
                    help="also run the forks alone and the return direction alone (uvloop)")
    args = ap.parse_args()
    print(f"sink child, {args.streams} sessions of {SESSION_S:g} s: one fork (WebSocket) + the "
          f"return direction (socket pair) each, 16 kHz pcm16, 20 ms frames, markers every 0.5 s")
    for _ in range(args.rounds):
        if args.before:
            print(await one_round("before", args.streams, args.hold, root=args.before), flush=True)
            print(await one_round("after", args.streams, args.hold), flush=True)
            continue
        for variant in ("asyncio", "uvloop"):
            print(await one_round(variant, args.streams, args.hold), flush=True)
    if args.parts:
        for only in ("fork", "return"):
            print(await one_round("uvloop", args.streams, args.hold, only), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
