"""Capacity of one Locust worker process: real-time 16 kHz probe streams it sustains, side by side
with a bare ``websockets`` send-and-receive loop of the same framing and pacing.

The reference pipeline (lossless hops, forks to the worker's sink, audio returned) runs in a
separate process. This process is one Locust worker (gevent, a ``LocalRunner`` of probe users, the
worker's own sink child process, which detects every marker of the worker's sessions: exactly what
``locust -f scenarios/...`` runs). Users are ramped step by step; a step passes while the frame
send lag p99 stays <= 5 ms and at most 0.1 % of the markers settled in the step were missed or
unmeasured (the generator's own overload guard fired). Then the same ramp for the bare loop: a
greenlet per stream sends 20 ms frames of unmarked audio on the same absolute schedule over the
``websockets`` sync client and reads the returned audio, no sink, no detection (pass: lag p99 <= 5
ms and at most 0.1 % of the frames not returned; its streams never end, so no session boundary
falls in a measured window). Both ramps go on past the last step asked for, in steps of 50, until
a step fails: a ceiling and the ratio of the two are never read off a ramp that stopped early.
Memory per stream is the growth of the resident memory of this process
plus its sink child over the probe ramp's passing steps divided by the streams added; CPU is shown
for the worker, its sink child and the pipeline (% of one core).

With ``--pin`` (a machine with 2 or more cores) the load generator runs alone on core 0 (this
process: the worker, or the bare loop) and everything else on the other cores (the sink child and
the pipeline; ``os.sched_setaffinity``, what ``taskset`` does), so the worker's own CPU per
stream-second is not shared with anything: the per-worker-core figure is clean. On a 2-core
machine the other core then carries both the pipeline and the sink child, and the ramp ends where
that core runs out; the line "worker core" says how busy core 0 was at each step. With
``--pin-child`` the worker and its sink child share core 0 and the pipeline has the others: the
streams one core sustains with all of a worker's work on it, detection included.

    python benchmarks/locust_capacity.py [--steps 25,50,75,100,...] [--hold 10] [--pin]
"""

from __future__ import annotations

import os

from gevent import monkey

monkey.patch_all()
# Before numpy is imported (as probe/__init__.py does): OpenBLAS worker threads spin.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from locust import events  # noqa: E402
from locust.env import Environment  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from probe.audio.formats import encode  # noqa: E402
from probe.locust import AudioProbeUser  # noqa: E402
from probe.locust.plugin import engine_of, hops_stats_of, totals_of  # noqa: E402
from probe.protocol import AudioFormat, IngressStart, to_json  # noqa: E402
from probe.session.core import new_trace_context  # noqa: E402
from probe.session.frames import carrier as _carrier  # noqa: E402

RATE = 16000
FRAME = 320  # 20 ms
LAG_P99_MS = 5.0
MISS_FRACTION = 0.001
SESSION_S = 20.0
# speech_en_us loses its marker 8 (4.25 s) in every session even at no load, in `probe run` too
# (a detector finding, reported); this voice keeps all of its markers at no load.
FIXTURE = "speech_en_scotland"

PIPELINE = """
import asyncio, sys
from probe.pipeline import ReferencePipeline
async def main():
    p = ReferencePipeline(sys.argv[2], spin=0.0)
    await p.start("127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Future()
asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Cores for this process and for the rest (--pin); None: no pinning.
PIN: tuple[set[int], set[int]] | None = None
CHILD_WITH_WORKER = False  # --pin-child: the sink child shares core 0 with the worker


def _pin(pid: int, mine: bool) -> None:
    """Pin every thread of ``pid`` (affinity is per thread: a process's threads that exist
    already keep theirs when only its main thread is pinned)."""
    if PIN is None:
        return
    cores = PIN[0] if mine else PIN[1]
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this process dies, however it dies (a harness that
    aborts must not leave its pipeline running)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Pipeline:
    def __init__(self, hops: str) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PIPELINE, str(self.port), hops], stdout=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        _pin(self.proc.pid, mine=False)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise SystemExit("the reference pipeline did not start")
        self.url = f"ws://127.0.0.1:{self.port}/"

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass
class Step:
    streams: int
    lag_p50: float
    lag_p99: float
    lost: int
    total: int
    cpu_pct: float
    pipe_cpu_pct: float
    rss_mib: float
    extra: str = ""
    sink_cpu_pct: float = 0.0

    @property
    def lost_fraction(self) -> float:
        return self.lost / self.total if self.total else 1.0

    @property
    def passed(self) -> bool:
        return self.lag_p99 <= LAG_P99_MS and self.lost_fraction <= MISS_FRACTION and self.total > 0

    def line(self, what: str) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"  {self.streams:4d} streams: lag p50 {self.lag_p50:6.2f} p99 {self.lag_p99:6.2f} ms; "
            f"{what} lost {self.lost}/{self.total} ({100 * self.lost_fraction:.3f} %); "
            f"CPU worker {self.cpu_pct:3.0f} % + sink child {self.sink_cpu_pct:3.0f} %, "
            f"pipeline {self.pipe_cpu_pct:3.0f} %; "
            f"RSS {self.rss_mib:5.0f} MiB {self.extra} -> {verdict}"
        )


def _measure(
    hold_s: float,
    pipe: Pipeline,
    sample: Callable[[], tuple[float, float, int, int, str]],
    sink_pid: int | None = None,
) -> tuple[float, float, int, int, float, float, str, float]:
    def sink_cpu() -> float:
        return _proc_cpu_s(sink_pid) if sink_pid is not None else 0.0

    cpu0, pcpu0, scpu0, t0 = time.process_time(), pipe.cpu_s(), sink_cpu(), time.monotonic()
    gevent.sleep(hold_s)
    wall = time.monotonic() - t0
    cpu, pcpu, scpu = time.process_time() - cpu0, pipe.cpu_s() - pcpu0, sink_cpu() - scpu0
    p50, p99, lost, total, extra = sample()
    return (p50, p99, lost, total, 100 * cpu / wall, 100 * pcpu / wall, extra,
            100 * scpu / wall)


class BenchUser(AudioProbeUser):
    session_s = SESSION_S
    fixture = FIXTURE


def probe_ramp(steps: list[int], hold_s: float, settle_s: float) -> tuple[list[Step], float]:
    pipe = Pipeline("a:20ms")
    os.environ["PROBE_HOP_ORDER"] = "a,return"
    os.environ["PROBE_MARKER_TIMEOUT"] = "3"
    env = Environment(user_classes=[BenchUser], events=events, host=pipe.url)
    runner = env.create_local_runner()
    events.init.fire(environment=env, runner=runner, web_ui=None)
    engine = engine_of(env)
    sink_pid = int(engine.sink.proc.pid)
    _pin(sink_pid, mine=CHILD_WITH_WORKER)

    def rss() -> float:
        return _rss_mib() + _rss_mib(sink_pid)

    out: list[Step] = []
    rss0 = rss()
    steps = list(steps)  # extended past the last one until a step fails, as the bare ramp's
    try:
        while steps:
            n = steps.pop(0)
            runner.start(n, spawn_rate=max(n, 1) / 2.0)
            gevent.sleep(2.0 + settle_s)
            events.reset_stats.fire()

            def sample() -> tuple[float, float, int, int, str]:
                # Markers sent in the window settle within the marker timeout after it.
                gevent.sleep(engine.cfg.marker_timeout_s + 0.5)
                engine.pump()
                stats = hops_stats_of(env)
                lag = stats.lag.summary_ms()
                t = totals_of(engine, getattr(env, "_probe_baseline", None))
                det = sum(c["detected"] for c in t.markers.values())
                # Unmeasured markers (the generator said it was overloaded) are not measured
                # either: for capacity they count as lost.
                missed = sum(c["missed"] for c in t.markers.values())
                unmeasured = sum(c["unmeasured"] for c in t.markers.values())
                miss = missed + unmeasured
                extra = (f"(worker {_rss_mib():.0f} + sink child {_rss_mib(sink_pid):.0f} MiB; "
                         f"failed sessions {t.sessions['failed']}; lost: missed {missed}, "
                         f"unmeasured {unmeasured})")
                return float(lag["p50"] or 0), float(lag["p99"] or 0), miss, det + miss, extra

            p50, p99, lost, total, cpu, pcpu, extra, scpu = _measure(
                hold_s, pipe, sample, sink_pid
            )
            step = Step(n, p50, p99, lost, total, cpu, pcpu, rss(), extra, scpu)
            out.append(step)
            print(step.line("markers"), flush=True)
            if not step.passed:
                break
            if not steps and n + 50 <= 2000:
                steps.append(n + 50)
    finally:
        runner.quit()
        events.quitting.fire(environment=env, reverse=True)
        pipe.stop()
    passing = [s for s in out if s.passed]
    per_stream = (passing[-1].rss_mib - rss0) / passing[-1].streams if passing else float("nan")
    if len(passing) >= 2:
        # Beside it (it carries the run's fixed costs too: caches and buffers made by the first
        # sessions), what each stream added between the last two passing steps.
        a, b = passing[-2], passing[-1]
        print(f"memory added per stream from {a.streams} to {b.streams} streams: "
              f"{(b.rss_mib - a.rss_mib) / (b.streams - a.streams):.2f} MiB (worker + sink child; "
              f"at 0 streams {rss0:.0f} MiB)", flush=True)
    return out, per_stream


def bare_ramp(steps: list[int], hold_s: float, settle_s: float) -> list[Step]:
    pipe = Pipeline("a:20ms")
    carrier, _ = _carrier(FIXTURE, RATE, SESSION_S)
    pcm = encode(carrier, "pcm_s16le")
    frames = [pcm[i : i + 2 * FRAME] for i in range(0, len(pcm), 2 * FRAME)]
    lags: list[float] = []
    counts = {"sent": 0, "received": 0}
    greenlets: list[Any] = []

    def stream(i: int) -> None:
        ws = connect(pipe.url, legacy=True, compression=None, ping_interval=None,
                     proxy=None, max_size=2**22)
        start = IngressStart(session=f"bare{i}x{time.monotonic_ns()}",
                             traceparent=new_trace_context(),
                             audio=AudioFormat("pcm_s16le", RATE, 1))
        ws.send(to_json(start))

        def rx(ws: Any = ws) -> None:
            try:
                for m in ws:
                    if isinstance(m, bytes):
                        counts["received"] += len(m) // (2 * FRAME)
            except Exception:
                return

        g = gevent.spawn(rx)
        base = time.monotonic()
        n = 0
        try:
            # One endless stream per greenlet: no session ends inside a measured window.
            while True:
                due = base + n * FRAME / RATE
                delay = due - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
                lags.append(max(0.0, time.monotonic() - due))
                ws.send(frames[n % len(frames)])
                counts["sent"] += 1
                n += 1
        finally:
            g.kill(block=False)
            ws.close()

    out: list[Step] = []
    # A ceiling is where a step fails: past the last step asked for, the ramp goes on in steps of
    # 50 (up to 2000 streams) until one does, so the ratio is never taken against a lower bound.
    steps = list(steps)
    try:
        while steps:
            n = steps.pop(0)
            while len(greenlets) < n:
                greenlets.append(gevent.spawn(stream, len(greenlets)))
                gevent.sleep(2.0 / n)
            gevent.sleep(settle_s)
            lags.clear()
            s0, r0 = counts["sent"], counts["received"]

            def sample(s0: int = s0, r0: int = r0) -> tuple[float, float, int, int, str]:
                a = np.array(lags) * 1000 if lags else np.zeros(1)
                # Frames sent in the window come back ~20 ms later: count returns a bit longer.
                sent = counts["sent"] - s0
                gevent.sleep(0.3)
                got = counts["received"] - r0
                return (float(np.percentile(a, 50)), float(np.percentile(a, 99)),
                        max(0, sent - got), sent, "")

            p50, p99, lost, total, cpu, pcpu, extra, _ = _measure(hold_s, pipe, sample)
            step = Step(n, p50, p99, lost, total, cpu, pcpu, _rss_mib(), extra)
            out.append(step)
            print(step.line("frames"), flush=True)
            if not step.passed:
                break
            if not steps and n + 50 <= 2000:
                steps.append(n + 50)
    finally:
        gevent.killall(greenlets, block=True, timeout=5)
        pipe.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="25,50,75,100,125,150,175,200,225,250,275,300,350,400")
    ap.add_argument("--hold", type=float, default=10.0, help="seconds measured per step")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--pin", action="store_true",
                    help="this process alone on core 0, the sink child and pipeline on the rest")
    ap.add_argument("--pin-child", action="store_true",
                    help="this process and its sink child together on core 0 (a worker core with "
                    "its detection), the pipeline alone on the rest")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval (s) for this process; the engine's default 1 ms")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    steps = [int(s) for s in args.steps.split(",")]
    if args.pin or args.pin_child:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise SystemExit("--pin and --pin-child need at least 2 cores")
        global PIN, CHILD_WITH_WORKER
        PIN = ({cores[0]}, set(cores[1:]))
        CHILD_WITH_WORKER = args.pin_child
        _pin(os.getpid(), mine=True)
        rest = ', '.join(map(str, cores[1:]))
        print(f"pinned: this process and its sink child on core {cores[0]}; the pipeline on {rest}"
              if CHILD_WITH_WORKER else
              f"pinned: this process on core {cores[0]}; sink child and pipeline on {rest}")
    print(f"one worker process, 16 kHz pcm_s16le, 20 ms frames, {SESSION_S:g} s sessions; "
          f"pipeline 'a:20ms' (lossless, fork + return) in a separate process; "
          f"{os.cpu_count()} cores on the machine, shared")
    print("probe users (markers every 0.5 s, fork and return detected):")
    probe, per_stream_mib = probe_ramp(steps, args.hold, args.settle)
    print("bare websockets loop (same framing and pacing, no markers, no sink):")
    bare = bare_ramp(steps, args.hold, args.settle)
    best_probe = max((s.streams for s in probe if s.passed), default=0)
    best_bare = max((s.streams for s in bare if s.passed), default=0)
    ratio = best_probe / best_bare if best_bare else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"probe streams sustained by one worker: {best_probe} "
          f"(target >= 250: {'MET' if best_probe >= 250 else 'NOT MET'})")
    print(f"bare websockets loop ceiling: {best_bare}; ratio {ratio:.2f} "
          f"(target >= 0.70: {'MET' if ratio >= 0.7 else 'NOT MET'})")
    print(f"memory per probe stream (worker + sink child, growth from 0 streams over the streams "
          f"of the last passing step): {per_stream_mib:.2f} MiB "
          f"(target <= 1 MiB: {'MET' if per_stream_mib <= 1.0 else 'NOT MET'}); "
          f"peak RSS {peak:.0f} MiB")
    last = next((s for s in reversed(probe) if s.passed), None)
    if last is not None:
        # CPU per stream-second at the same load, so the worker's own cost compares with the
        # bare loop's; "per core" divides one core by it (a rate, not a ceiling measured here).
        same = next((s for s in bare if s.streams == last.streams), None)
        w_ms, c_ms = 10 * last.cpu_pct / last.streams, 10 * last.sink_cpu_pct / last.streams
        line = (f"CPU per stream-second at {last.streams} streams: worker {w_ms:.2f} ms "
                f"(~{1000 / w_ms:.0f} streams per core) + sink child {c_ms:.2f} ms "
                f"(~{1000 / c_ms:.0f} per core)")
        if same is not None:
            b_ms = 10 * same.cpu_pct / same.streams
            line += f"; bare loop {b_ms:.2f} ms (~{1000 / b_ms:.0f} per core)"
        print(line)
        p_ms = 10 * last.pipe_cpu_pct / last.streams
        print(f"worker and its sink child together: {w_ms + c_ms:.2f} ms per stream-second "
              f"(~{1000 / (w_ms + c_ms):.0f} streams per core, at 100 % of it); the pipeline "
              f"under test {p_ms:.2f} ms")
    failed = next((s for s in probe if not s.passed), None)
    if failed is not None:
        # Where the ramp ran out: the step's own CPU figures (% of one core each).
        other = failed.sink_cpu_pct + failed.pipe_cpu_pct
        where = (f"core 0 (worker {failed.cpu_pct:.0f} % + sink child {failed.sink_cpu_pct:.0f} "
                 f"% = {failed.cpu_pct + failed.sink_cpu_pct:.0f} %), the other core (pipeline) "
                 f"{failed.pipe_cpu_pct:.0f} %" if CHILD_WITH_WORKER else
                 f"core 0 (the worker alone) {failed.cpu_pct:.0f} %, the other core (sink child "
                 f"+ pipeline) {other:.0f} %" if PIN is not None else
                 f"worker {failed.cpu_pct:.0f} % + sink child {failed.sink_cpu_pct:.0f} % + "
                 f"pipeline {failed.pipe_cpu_pct:.0f} % = {failed.cpu_pct + other:.0f} % of "
                 f"{os.cpu_count()} cores' {100 * (os.cpu_count() or 1)} %")
        print(f"first failing step ({failed.streams} streams): {where}")
    print("note: a step ends at the first failing load; the steps are coarse, so the true "
          "ceiling lies between the last passing step and the first failing one")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"probe": [s.__dict__ for s in probe], "bare": [s.__dict__ for s in bare],
                       "probe_streams": best_probe, "bare_streams": best_bare, "ratio": ratio,
                       "mib_per_stream": per_stream_mib}, f, indent=2)


if __name__ == "__main__":
    main()
