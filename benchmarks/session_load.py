"""Send lag and CPU of N concurrent real-time 16 kHz sessions driven from one probe process.

The reference pipeline runs in a separate process (`probe pipeline`), one hop that forks to the
probe's sink and returns the audio, so the probe process does all of a real run's work: pacing
and sending, the sink, and detection on the fork and return streams.

    python benchmarks/session_load.py [--sessions 50] [--duration 20]
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

from probe.runner import RunConfig, run_probe
from probe.source import SourceConfig


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
    args = ap.parse_args()
    port = _free_port()
    pipe = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "pipeline", "--listen", f"127.0.0.1:{port}",
         "--hops", "hop:20ms"],
    )
    try:
        _wait_port(port)
        cfg = RunConfig(
            source=SourceConfig(target=f"ws://127.0.0.1:{port}/", duration_s=args.duration),
            sessions=args.sessions,
            concurrency=args.sessions,
            hop_order=["hop", "return"],
            marker_timeout_s=5.0,
        )
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        report = asyncio.run(run_probe(cfg))
        cpu = time.process_time() - cpu0
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
    print(f"probe process CPU: {cpu:.1f} s over {wall:.1f} s wall = {100 * cpu / wall:.0f} % "
          f"of one core; {1000 * cpu / (args.sessions * args.duration):.2f} ms per "
          f"session-second; peak RSS {rss_mib:.0f} MiB")
    for hop in report["hops"]:
        m = hop["markers"]
        lat = hop["latency_ms"]
        print(f"hop {hop['name']}: sent {m['sent']} detected {m['detected']} missed {m['missed']};"
              f" latency p50 {lat['p50']} p99 {lat['p99']} ms")
    print(f"sessions: {report['sessions']['completed']} completed, "
          f"{report['sessions']['failed']} failed")
    verdict = "PASS" if (lag["p99"] or 0) <= 5.0 else "MISS"
    print(f"target send lag p99 <= 5 ms: {verdict} ({lag['p99']} ms)")


if __name__ == "__main__":
    main()
