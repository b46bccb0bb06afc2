"""Memory over a long Locust run: is the worker's and its sink child's resident memory flat?

One Locust worker process (gevent, a ``LocalRunner`` of 20 closed-model probe users by default,
each streaming 20 s sessions back to back, with the worker's own sink child process detecting
every marker) against the reference pipeline ('a:20ms', lossless, fork and return) in another
process, as ``benchmarks/locust_capacity.py`` sets it up. The resident memory (VmRSS) of the
worker and of its sink child is sampled every ``--every`` seconds; growth is measured from the
end of the warm-up (``--warmup`` minutes: carriers loaded, caches and allocator pools filled) to
the end. Marker accounting is printed with it, so a flat line cannot come from lost work.

    python benchmarks/locust_soak.py [--minutes 60] [--users 20] [--every 30] [--warmup 5]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Monkey-patches (gevent) on import, before anything else is imported.
import locust_capacity as lc  # noqa: E402, I001

import argparse  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from locust import events  # noqa: E402
from locust.env import Environment  # noqa: E402

from probe.locust.plugin import engine_of, totals_of  # noqa: E402

TARGET_GROWTH = 0.05


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=5.0, help="minutes before the baseline")
    args = ap.parse_args()
    pipe = lc.Pipeline("a:20ms")
    os.environ["PROBE_HOP_ORDER"] = "a,return"
    os.environ["PROBE_MARKER_TIMEOUT"] = "3"
    env = Environment(user_classes=[lc.BenchUser], events=events, host=pipe.url)
    runner = env.create_local_runner()
    events.init.fire(environment=env, runner=runner, web_ui=None)
    engine = engine_of(env)
    sink_pid = int(engine.sink.proc.pid)
    print(f"{args.users} users, {lc.SESSION_S:g} s sessions back to back, {args.minutes:g} min; "
          f"RSS every {args.every:g} s, baseline after {args.warmup:g} min", flush=True)
    print(f"{'min':>6s} {'worker MiB':>10s} {'sink MiB':>9s} {'sessions':>8s} {'sent':>8s} "
          f"{'detected':>8s} {'missed':>7s}", flush=True)
    t0 = time.monotonic()
    base: tuple[float, float] | None = None
    last = (0.0, 0.0)
    try:
        runner.start(args.users, spawn_rate=args.users / 2.0)
        while (elapsed := time.monotonic() - t0) < args.minutes * 60:
            gevent.sleep(args.every)
            engine.pump()
            t = totals_of(engine)
            sent = sum(c["sent"] for c in t.markers.values())
            det = sum(c["detected"] for c in t.markers.values())
            miss = sum(c["missed"] for c in t.markers.values())
            last = (lc._rss_mib(), lc._rss_mib(sink_pid))
            elapsed = time.monotonic() - t0
            if base is None and elapsed >= args.warmup * 60:
                base = last
            print(f"{elapsed / 60:6.1f} {last[0]:10.1f} {last[1]:9.1f} "
                  f"{t.sessions.get('started', 0):8d} {sent:8d} {det:8d} {miss:7d}", flush=True)
    finally:
        runner.quit()
        events.quitting.fire(environment=env, reverse=True)
        pipe.stop()
    if base is None:
        print("the run ended before the warm-up: no growth figure")
        return 1
    for what, b, e in (("worker", base[0], last[0]), ("sink child", base[1], last[1])):
        growth = (e - b) / b
        verdict = "MET" if growth <= TARGET_GROWTH else "NOT MET"
        print(f"{what}: {b:.1f} -> {e:.1f} MiB after warm-up, growth {100 * growth:+.1f} % "
              f"(target <= {100 * TARGET_GROWTH:.0f} %: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
