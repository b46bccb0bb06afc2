"""CPU per stream-second of a Locust worker's WebSocket transport, side by side: the ``websockets``
sync client under gevent (what the bare loop of ``locust_capacity.py`` uses, and what the probe's
Locust sessions used before) against :mod:`probe.locust.wsconn` (websockets' sans-I/O protocol on
a gevent socket, what they use now).

Each variant runs in a fresh process (gevent monkey-patched, as in Locust): ``--streams`` greenlets
each send 20 ms frames of 16 kHz pcm16 on an absolute schedule to the reference pipeline ('a:20ms'
in another process, no fork) and read the returned audio; after ``--settle`` seconds the process
measures its own CPU time over ``--hold`` seconds and the frames' send lag. Variants alternate over
``--rounds``, so drift in the machine's load falls on both.

    python benchmarks/gevent_client.py [--streams 100] [--hold 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CLIENT = r"""
from gevent import monkey
monkey.patch_all()
import json, resource, sys, time
import gevent
from probe.audio.formats import encode
from probe.protocol import AudioFormat, IngressStart, to_json
from probe.session.core import new_trace_context
from probe.session.frames import carrier
variant, url, n_streams = sys.argv[1], sys.argv[2], int(sys.argv[3])
settle, hold = float(sys.argv[4]), float(sys.argv[5])
RATE, FRAME = 16000, 320
pcm = encode(carrier("speech_en_scotland", RATE, 20.0)[0], "pcm_s16le")
frames = [pcm[i:i + 2 * FRAME] for i in range(0, len(pcm) - 2 * FRAME, 2 * FRAME)]
lags, counts = [], {"sent": 0, "received": 0}

def opening(i):
    return to_json(IngressStart(session=f"g{i}x{time.monotonic_ns()}",
                                traceparent=new_trace_context(),
                                audio=AudioFormat("pcm_s16le", RATE, 1)))

def on_message(m, at):
    if isinstance(m, bytes):
        counts["received"] += len(m) // (2 * FRAME)

def stream(i):
    if variant == "websockets-sync":
        from websockets.sync.client import connect
        ws = connect(url, compression=None, ping_interval=None, proxy=None, max_size=2**22)
        def rx():
            try:
                for m in ws:
                    on_message(m, 0.0)
            except Exception:
                return
    else:
        from probe.locust.wsconn import open_client
        ws = open_client(url, clock=time.time, open_timeout=10)
        def rx():
            ws.receive(on_message)
    ws.send(opening(i))
    gevent.spawn(rx)
    base, n = time.monotonic(), 0
    while True:
        due = base + n * FRAME / RATE
        delay = due - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        lags.append(max(0.0, time.monotonic() - due))
        ws.send(frames[n % len(frames)])
        counts["sent"] += 1
        n += 1

for i in range(n_streams):
    gevent.spawn(stream, i)
    gevent.sleep(2.0 / n_streams)
gevent.sleep(settle)
lags.clear()
s0, r0 = counts["sent"], counts["received"]
ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
gevent.sleep(hold)
ru1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
sent = counts["sent"] - s0
gevent.sleep(0.3)
got = counts["received"] - r0
cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
lags.sort()
p99 = lags[int(0.99 * (len(lags) - 1))] * 1000 if lags else 0.0
print(json.dumps({"cpu_s": cpu, "wall_s": t1 - t0, "sent": sent, "lost": max(0, sent - got),
                  "p99_ms": p99}), flush=True)
import os
os._exit(0)
"""

VARIANTS = ("websockets-sync", "probe-wsconn")


@contextlib.contextmanager
def pipeline(hops: str) -> Iterator[str]:
    """The reference pipeline in another process; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "pipeline", "--listen", f"127.0.0.1:{port}",
         "--hops", hops], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the reference pipeline did not start")
            time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--hold", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    with pipeline("a:20ms") as url:
        print(f"{args.streams} streams of 16 kHz pcm16 in 20 ms frames, paced, audio returned by "
              f"the reference pipeline 'a:20ms' (another process); CPU of the client process over "
              f"{args.hold:g} s; {os.cpu_count()} cores, shared")
        per: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for v in VARIANTS:
                out = subprocess.run(
                    [sys.executable, "-c", CLIENT, v, url, str(args.streams), str(args.settle),
                     str(args.hold)],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=120 + args.hold,
                )
                if out.returncode != 0 or not out.stdout.strip():
                    print(f"round {r + 1} {v}: FAILED: {out.stderr.strip()[-800:]}")
                    continue
                m = json.loads(out.stdout.strip().splitlines()[-1])
                ms = 1000 * m["cpu_s"] / (args.streams * m["wall_s"])
                per[v].append(ms)
                print(f"round {r + 1} {v:16s}: {ms:.2f} ms CPU per stream-second "
                      f"({100 * m['cpu_s'] / m['wall_s']:.0f} % of a core); send lag p99 "
                      f"{m['p99_ms']:.2f} ms; frames not returned {m['lost']}/{m['sent']}",
                      flush=True)
        if all(per.values()):
            a, b = (statistics.median(per[v]) for v in VARIANTS)
            print(f"median: websockets-sync {a:.2f} ms, probe-wsconn {b:.2f} ms per stream-second; "
                  f"ratio {b / a:.2f} (~{1000 / a:.0f} vs ~{1000 / b:.0f} streams per core)")


if __name__ == "__main__":
    main()
