"""CPU per stream-second of the reference pipeline, two code versions side by side.

The pipeline (``ReferencePipeline(HOPS, spin=0.0)``, what benchmarks/locust_capacity.py runs) is
started in its own process once per variant and round, with ``PYTHONPATH`` pointing at that
variant's source tree (``--before``: a git worktree of the old code; ``--after``: this checkout).
A client process opens N streams of 16 kHz pcm16 in 20 ms frames, each paced on its own absolute
schedule (start times spread over one frame), and reads the audio that comes back; a sink process
accepts every fork and only reads it. After a warm-up, the pipeline's process CPU (user + system,
``/proc/PID/stat``) is sampled over a window while all N streams run, and divided by N times the
window. Variants alternate round by round (before, after, after, before, ...), so a neighbour's
load on a shared machine falls on all alike; the table shows each round and the median.

The client also reports, per variant, the frames that came back in the window and the return
latency (arrival back at the client minus the frame's send time; the hop's delay included) p50
and p99, to show the cheaper code keeps the timing.

    python benchmarks/pipeline_cost.py --before /tmp/wt_pipe [--variant NAME=DIR ...]
        [--streams 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

PIPELINE = """
import asyncio, sys
import probe
from probe.pipeline import ReferencePipeline
async def main():
    p = ReferencePipeline(sys.argv[2], spin=0.0)
    await p.start("127.0.0.1", int(sys.argv[1]))
    print("ready", probe.__file__, flush=True)
    await asyncio.Future()
asyncio.run(main())
"""

SINK = """
import asyncio, sys
from websockets.asyncio.server import serve
async def fork(ws):
    async for _ in ws:
        pass
async def main():
    async with serve(fork, "127.0.0.1", int(sys.argv[1]), compression=None):
        print("ready", flush=True)
        await asyncio.Future()
asyncio.run(main())
"""

CLIENT = """
import asyncio, json, sys, time
import numpy as np
from websockets.asyncio.client import connect
url, sink, n, seconds, warm, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
    float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
FRAME = 0.020
rng = np.random.default_rng(1)
# loud enough that the pcm16 round trip's rounding shows in samples above half scale
audio = (rng.standard_normal(16000 * 2) * 9000).clip(-32768, 32767).astype("<i2").tobytes()
frames = [audio[i:i + 640] for i in range(0, len(audio), 640)]
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
lat = []
got = [0]

async def stream(i, t0, w0, w1):
    start = {"type": "start", "session": f"s{i}", "traceparent": TP, "sink": sink,
             "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}}
    async with connect(url, compression=None, max_queue=None) as ws:
        await ws.send(json.dumps(start))
        sent = []
        async def reader():
            back = 0
            async for m in ws:
                if isinstance(m, bytes):
                    now = time.time()
                    k = back // 640
                    back += len(m)
                    if w0 <= now < w1 and k < len(sent):
                        lat.append(now - sent[k])
                        got[0] += 1
        task = asyncio.create_task(reader())
        k = 0
        end = t0 + seconds
        while True:
            due = t0 + k * FRAME
            if due >= end:
                break
            d = due - time.time()
            if d > 0:
                await asyncio.sleep(d)
            sent.append(due)
            await ws.send(frames[k % len(frames)])
            k += 1
        await ws.send(json.dumps({"type": "stop"}))
        await task

async def main():
    base = time.time() + 0.5
    w0 = base + FRAME + warm
    w1 = w0 + window
    print(json.dumps({"w0": w0, "w1": w1}), flush=True)
    await asyncio.gather(*(stream(i, base + FRAME * i / n, w0, w1) for i in range(n)))
    lat.sort()
    q = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    print(json.dumps({"got": got[0], "p50": q(0.5), "p99": q(0.99)}), flush=True)
asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), OPENBLAS_NUM_THREADS="1")
    return env


def _spawn(code: str, args: list[str], tree: Path) -> subprocess.Popen[bytes]:
    # -c puts the working directory first on sys.path, ahead of PYTHONPATH: run in the tree
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            env=_env(tree), cwd=tree)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    if not line or line[0] != "ready":
        proc.kill()
        raise SystemExit("a child process did not start")
    if len(line) > 1 and not Path(line[1]).resolve().is_relative_to(tree):
        proc.kill()
        raise SystemExit(f"the child runs {line[1]}, not the code in {tree}")
    return proc


def one_round(tree: Path, sink: str, hops: str, streams: int, warm: float,
              window: float) -> dict[str, float]:
    port = _free_port()
    pipe = _spawn(PIPELINE, [str(port), hops], tree)
    try:
        seconds = warm + window + 1.0
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, f"ws://127.0.0.1:{port}/", sink, str(streams),
             str(seconds), str(warm), str(window)],
            stdout=subprocess.PIPE, env=_env(HERE), cwd=HERE,
        )
        assert client.stdout is not None
        times = json.loads(client.stdout.readline())
        time.sleep(max(0.0, times["w0"] - time.time()))
        c0 = _cpu_s(pipe.pid)
        time.sleep(max(0.0, times["w1"] - time.time()))
        c1 = _cpu_s(pipe.pid)
        result = json.loads(client.stdout.readline())
        client.wait(timeout=30)
    finally:
        pipe.terminate()
        pipe.wait(timeout=10)
    expected = streams * window / 0.020
    return {"ms": 1000.0 * (c1 - c0) / (streams * window), "back": result["got"] / expected,
            "p50": result["p50"], "p99": result["p99"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="source tree of the old code")
    ap.add_argument("--after", type=Path, default=HERE, help="source tree of the new code")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="one more source tree to measure alongside (repeatable)")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=float, default=3.0, help="seconds before the window")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of CPU measured")
    ap.add_argument("--hops", default="a:20ms")
    args = ap.parse_args()

    sink_port = _free_port()
    sink = _spawn(SINK, [str(sink_port)], HERE)
    sink_url = f"ws://127.0.0.1:{sink_port}/"
    variants = {"before": args.before.resolve()}
    for spec in args.variant:
        name, _, tree = spec.partition("=")
        variants[name] = Path(tree).resolve()
    variants["after"] = args.after.resolve()
    width = max(len(name) for name in variants)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    try:
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                res = one_round(variants[name], sink_url, args.hops, args.streams, args.warm,
                                args.window)
                runs[name].append(res)
                print(f"round {r + 1} {name:{width}s}: {res['ms']:.2f} ms CPU per stream-second "
                      f"({res['ms'] * args.streams / 10:.1f} % of a core), "
                      f"{100 * res['back']:.1f} % of frames back, return latency "
                      f"p50 {res['p50']:.1f} ms p99 {res['p99']:.1f} ms", flush=True)
    finally:
        sink.terminate()
        sink.wait(timeout=10)
    print(f"\npipeline {args.hops!r}, spin=0, {args.streams} streams of 16 kHz pcm16, 20 ms "
          f"frames, {args.window:g} s windows, {args.rounds} rounds (median):")
    base = statistics.median(x["ms"] for x in runs["before"])
    for name, results in runs.items():
        ms = statistics.median(x["ms"] for x in results)
        print(f"  {name:{width}s} {ms:5.2f} ms CPU per stream-second "
              f"({ms * args.streams / 10:.1f} % of a core; {ms / base:.2f}x before), "
              f"return p50 {statistics.median(x['p50'] for x in results):.1f} ms "
              f"p99 {statistics.median(x['p99'] for x in results):.1f} ms")


if __name__ == "__main__":
    main()
