"""Memory over a long `probe run`: the probe, its sink child and the reference pipeline.

Starts ``probe pipeline`` (hops 'a:20ms,b:35ms:mulaw8k', lossless) and one ``probe run`` of many
sessions at a fixed concurrency against it, each process as the user would start it. Every
``--every`` seconds the resident memory (VmRSS) of the probe's main process, its sink child and
the pipeline is sampled; growth is measured from the end of the warm-up (``--warmup`` minutes) to
the end of the run. The run's own report then gives the marker accounting, so a flat line cannot
come from lost work.

A ``probe run`` report lists every marker on every hop (its ``series``) and takes its
percentiles from every latency and send lag: the probe spools these as compact records to an
unlinked temporary file during the run (``probe/measure/spool.py``) and streams them into the
report, so its main process must stay flat too (before that it held ~300 B of Python objects per
row). The figure printed beside the probe's growth is the rows added after the warm-up and what
the growth comes to per row.

    python benchmarks/soak.py [--minutes 30] [--concurrency 20] [--every 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_GROWTH = 0.05
HOPS = "a:20ms,b:35ms:mulaw8k"
SESSION_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _child_of(pid: int, needle: bytes) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == pid and needle in cmd:
            return int(entry)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=5.0, help="minutes before the baseline")
    args = ap.parse_args()
    seconds = args.minutes * 60.0
    sessions = max(1, int(seconds / SESSION_S * args.concurrency))
    port = _free_port()
    probe = [sys.executable, "-m", "probe.cli"]
    pipe = subprocess.Popen([*probe, "pipeline", "--listen", f"127.0.0.1:{port}", "--hops", HOPS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(3.0)
    out = Path(tempfile.mkdtemp()) / "soak.json"
    run = subprocess.Popen(
        [*probe, "run", "--target", f"ws://127.0.0.1:{port}/", "--sessions", str(sessions),
         "--concurrency", str(args.concurrency), "--duration", f"{SESSION_S:g}",
         "--marker-timeout", "5", "--hop-order", "a,b,return", "--json", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    print(f"probe run: {sessions} sessions of {SESSION_S:g} s, {args.concurrency} at once "
          f"(~{args.minutes:g} min), against probe pipeline '{HOPS}'; RSS every {args.every:g} s, "
          f"baseline after {args.warmup:g} min", flush=True)
    print(f"{'min':>6s} {'probe MiB':>10s} {'sink child':>11s} {'pipeline':>9s}", flush=True)
    t0 = time.monotonic()
    rows: list[tuple[float, float, float, float]] = []
    child: int | None = None
    try:
        while run.poll() is None:
            time.sleep(args.every)
            if child is None:
                child = _child_of(run.pid, b"probe.aio.sinkproc")
            if run.poll() is not None:
                break
            m = (time.monotonic() - t0) / 60.0
            row = (m, _rss_mib(run.pid), _rss_mib(child) if child else float("nan"),
                   _rss_mib(pipe.pid))
            rows.append(row)
            print(f"{row[0]:6.1f} {row[1]:10.1f} {row[2]:11.1f} {row[3]:9.1f}", flush=True)
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
        run.wait(timeout=120)
        pipe.send_signal(signal.SIGINT)
        try:
            pipe.wait(timeout=30)
        except subprocess.TimeoutExpired:  # it has been seen to outlast SIGINT on a loaded box
            print("probe pipeline: still running 30 s after SIGINT; terminated", flush=True)
            pipe.terminate()
            pipe.wait(timeout=30)
    report = json.loads(out.read_text())
    marks = {h["name"]: h["markers"] for h in report["hops"]}
    sent = sum(m["sent"] for m in marks.values())
    print(f"report: sessions {report['sessions']['completed']}/{report['sessions']['started']} "
          f"completed, rows (markers x hops) {sent}, "
          + ", ".join(f"{h} sent {m['sent']} detected {m['detected']} missed {m['missed']}"
                      for h, m in marks.items()), flush=True)
    base = next((r for r in rows if r[0] >= args.warmup), None)
    if base is None or len(rows) < 2:
        print("too short for a baseline")
        return 1
    last = rows[-1]
    # Rows held by the probe when the baseline and the last sample were taken (sessions run at a
    # steady rate, so rows grow in proportion to time).
    per_min = sent / max(1e-9, rows[-1][0] + SESSION_S / 60.0)
    added_rows = per_min * (last[0] - base[0])
    for name, i in (("probe (main)", 1), ("sink child", 2), ("pipeline", 3)):
        growth = (last[i] - base[i]) / base[i]
        line = (f"{name}: {base[i]:.1f} -> {last[i]:.1f} MiB after warm-up, "
                f"growth {100 * growth:+.1f} %")
        if i == 1:
            per_row = (last[i] - base[i]) * 1024 * 1024 / max(1.0, added_rows)
            line += (f" (the report's series: ~{added_rows:.0f} rows added meanwhile, "
                     f"{per_row:.0f} bytes per row)")
        line += f" (target <= 5 %: {'MET' if growth <= TARGET_GROWTH else 'NOT MET'})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
