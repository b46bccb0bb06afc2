"""Send lag, CPU and accuracy of N concurrent real-time 16 kHz sessions driven from one probe.

The reference pipeline runs in a separate process (`probe pipeline`), by default one hop that
forks to the probe's sink and returns the audio, so the probe does all of a real run's work:
pacing and sending, the sink (in its own child process, as `probe run` does), and detection on
the fork and return streams. Each hop's measured cumulative latency is printed beside the
configured one (the sum of the delays up to it) with the error of p50 and p99.

    python benchmarks/session_load.py [--sessions 50] [--duration 20] [--hops SPEC]
    python benchmarks/session_load.py --sessions 4 --hops a:20ms,b:35ms:mulaw8k,c:120ms
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import time

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig
from probe.pipeline import parse_hops


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the pipeline did not start listening on port {port}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--hops", default="hop:20ms")
    ap.add_argument("--in-process-sink", action="store_true", help="no sink child process")
    args = ap.parse_args()
    hops = parse_hops(args.hops)
    configured: dict[str, float] = {}
    total = 0.0
    for h in hops:
        total += h.delay * 1000.0
        configured[h.name] = total
    configured["return"] = total
    port = _free_port()
    pipe = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "pipeline", "--listen", f"127.0.0.1:{port}",
         "--hops", args.hops],
    )
    try:
        _wait_port(port)
        cfg = RunConfig(
            source=SourceConfig(target=f"ws://127.0.0.1:{port}/", duration_s=args.duration),
            sessions=args.sessions,
            concurrency=args.sessions,
            hop_order=[h.name for h in hops] + ["return"],
            marker_timeout_s=5.0,
            sink_process=not args.in_process_sink,
        )
        cpu0 = time.process_time()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.monotonic()
        report = asyncio.run(run_probe(cfg))
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # The sink child has been waited for by now; the pipeline (still running) has not.
        sink_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
        cpu = time.process_time() - cpu0 + sink_cpu
        wall = time.monotonic() - wall0
    finally:
        pipe.terminate()
        pipe.wait(timeout=10)
    lag = report["send_lag_ms"]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"sessions: {args.sessions} concurrent x {args.duration:g} s, 16 kHz pcm_s16le, 20 ms "
          f"frames, one process ({os.cpu_count()} cores on the machine)")
    print(f"send lag ms: p50 {lag['p50']}  p95 {lag['p95']}  p99 {lag['p99']}  "
          f"max {lag['max']}  (n={lag['count']})")
    print(f"probe CPU (main + sink child {sink_cpu:.1f} s): {cpu:.1f} s over {wall:.1f} s wall "
          f"= {100 * cpu / wall:.0f} % of one core; "
          f"{1000 * cpu / (args.sessions * args.duration):.2f} ms per session-second; "
          f"peak RSS {rss_mib:.0f} MiB")
    for hop in report["hops"]:
        m = hop["markers"]
        lat = hop["latency_ms"]
        want = configured.get(hop["name"])
        err = ""
        if want is not None and lat["count"]:
            err = (f"; configured {want:g} ms, error p50 {lat['p50'] - want:+.2f} "
                   f"p99 {lat['p99'] - want:+.2f} ms")
        print(f"hop {hop['name']}: sent {m['sent']} detected {m['detected']} missed {m['missed']};"
              f" latency p50 {lat['p50']} p99 {lat['p99']} ms{err}")
    print(f"sessions: {report['sessions']['completed']} completed, "
          f"{report['sessions']['failed']} failed")
    verdict = "PASS" if (lag["p99"] or 0) <= 5.0 else "MISS"
    print(f"target send lag p99 <= 5 ms: {verdict} ({lag['p99']} ms)")


if __name__ == "__main__":
    main()
