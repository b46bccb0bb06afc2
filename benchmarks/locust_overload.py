"""An overloaded Locust worker: does the probe say so, and does it keep the target blameless?

One Locust worker process (gevent, a ``LocalRunner``, its own sink child) against the reference
pipeline ('a:20ms', lossless: every marker it is sent, it delivers) in another process, as
``benchmarks/locust_capacity.py`` sets it up. Open-model users start sessions at a fixed rate
whatever happens to the earlier ones, past what one worker sustains on this machine. The target
loses nothing, so every marker not detected is the probe's own failure: it must be counted
*unmeasured* while the generator says it is overloaded, and *missed* never.

Printed every 5 s: sessions, send lag p99 of the last window, whether the worker counts as
overloaded and why, and the marker totals (sent, detected, missed, unmeasured). At the end: the
overloaded periods with their evidence, and the markers missed while overloaded (target: 0).

    python benchmarks/locust_overload.py [--rate 12] [--seconds 60] [--session-s 20]
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
from typing import Any, ClassVar  # noqa: E402

import gevent  # noqa: E402
from locust import events  # noqa: E402
from locust.env import Environment  # noqa: E402

from probe.locust import OpenAudioProbeUser  # noqa: E402
from probe.locust.plugin import engine_of, hops_stats_of, totals_of  # noqa: E402


class OverloadUser(OpenAudioProbeUser):
    fixture = lc.FIXTURE
    sessions_per_s: ClassVar[float] = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=12.0, help="sessions started per second")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--session-s", type=float, default=20.0)
    args = ap.parse_args()
    pipe = lc.Pipeline("a:20ms")
    os.environ["PROBE_HOP_ORDER"] = "a,return"
    os.environ["PROBE_MARKER_TIMEOUT"] = "3"
    os.environ["PROBE_SESSION_RATE"] = str(args.rate)
    os.environ["PROBE_SESSION_S"] = str(args.session_s)
    env = Environment(user_classes=[OverloadUser], events=events, host=pipe.url)
    runner = env.create_local_runner()
    events.init.fire(environment=env, runner=runner, web_ui=None)
    engine = engine_of(env)
    print(f"open model: {args.rate:g} sessions/s of {args.session_s:g} s (up to "
          f"{args.rate * args.session_s:.0f} at once) for {args.seconds:g} s against a lossless "
          "pipeline", flush=True)
    print(f"{'s':>5s} {'active':>6s} {'lag p99':>8s} {'overloaded':>10s} {'sent':>7s} "
          f"{'detected':>8s} {'missed':>6s} {'unmeasured':>10s}  signals", flush=True)
    t0 = time.monotonic()
    try:
        runner.start(1, spawn_rate=1)
        while time.monotonic() - t0 < args.seconds:
            gevent.sleep(5.0)
            stats = hops_stats_of(env)
            lag = stats.lag.summary_ms()
            stats.lag = type(stats.lag)()  # the next line's p99 is the next window's
            t = totals_of(engine)
            m = t.markers.values()
            gen = engine.registry.generator() or {}
            periods = gen.get("periods") or []
            signals = ", ".join(str(e["signal"]) for e in (periods[-1]["evidence"]
                                                            if periods else []))
            print(f"{time.monotonic() - t0:5.0f} {t.sessions['active']:6d} "
                  f"{float(lag['p99'] or 0):8.1f} {str(engine.overloaded):>10s} "
                  f"{sum(c['sent'] for c in m):7d} {sum(c['detected'] for c in m):8d} "
                  f"{sum(c['missed'] for c in m):6d} {sum(c['unmeasured'] for c in m):10d}  "
                  f"{signals}", flush=True)
        # Before stopping the users: stopping hundreds of overloaded sessions at once has ended
        # this harness with a libev assertion (gevent) before it could print anything more.
        return _summary(engine)
    finally:
        runner.quit()
        events.quitting.fire(environment=env, reverse=True)
        pipe.stop()


def _summary(engine: Any) -> int:
    t = totals_of(engine)
    m = t.markers.values()
    gen = engine.registry.generator() or {}
    missed = sum(c["missed"] for c in m)
    unmeasured = sum(c["unmeasured"] for c in m)
    pending = sum(c["pending"] for c in m)
    print(f"\nmarkers: sent {sum(c['sent'] for c in m)}, detected "
          f"{sum(c['detected'] for c in m)}, missed {missed}, unmeasured {unmeasured}, "
          f"still pending {pending}; "
          f"frames {gen.get('frames')}, over {gen.get('bounds', {}).get('send_lag_p99_ms')} ms "
          f"late {gen.get('late_frames')}; frames shed by the sink child "
          f"{gen.get('frames_shed')}")
    for p in gen.get("periods", []):
        ev = "; ".join(f"{e['signal']} {e['value']:g} (bound {e['bound']:g})"
                       for e in p["evidence"])
        end = "the end" if p["end"] is None else f"{p['end'] - p['start']:.0f} s later"
        print(f"overloaded from {time.strftime('%H:%M:%S', time.localtime(p['start']))} "
              f"to {end}: {ev}")
    flagged = bool(gen.get("overloaded"))
    print(f"guard fired: {'yes' if flagged else 'NO'}; markers blamed on the lossless target "
          f"(missed): {missed} (target 0: {'MET' if flagged and missed == 0 else 'NOT MET'})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
