"""Locust runs of the probe users, as subprocesses, against the reference pipeline on loopback.

Every run is a real ``locust`` process (gevent monkey patching, the websockets sync client and the
worker's sync sink) against ``probe pipeline`` in another process; faults come from real peers: a
pipeline killed mid-run, a port already taken.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import SLOW, free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = str(ROOT / "scenarios" / "locust_reference.py")
OPEN = str(ROOT / "scenarios" / "locust_open.py")
# One factor for slow machines (CI, a shared box).


@contextmanager
def pipeline(hops: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "pipeline", "--listen", f"127.0.0.1:{port}",
         "--hops", hops],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield f"ws://127.0.0.1:{port}/", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def locust_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROBE_", "OTEL_"))}
    env.update({"PROBE_SESSION_S": "3", "PROBE_MARKER_TIMEOUT": "3"})
    env.update(extra)
    return env


def run_locust(args: list[str], env: dict[str, str], timeout: float = 40.0) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "locust", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * SLOW,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def stat(rows: list[dict[str, str]], kind: str, name: str) -> dict[str, str]:
    return next(r for r in rows if r["Type"] == kind and r["Name"] == name)


def test_closed_loop_reports_each_hop_exactly(tmp_path: Path) -> None:
    with pipeline("a:20ms,b:35ms") as (url, _):
        res = run_locust(
            ["-f", REFERENCE, "--headless", "-u", "2", "-r", "2", "-t", "7s", "--host", url,
             "--csv", str(tmp_path / "run"), "--exit-code-on-error", "0"],
            locust_env(PROBE_HOP_ORDER="a,b,return"),
        )
    assert res.returncode == 0, res.stderr[-3000:]
    stats = read_csv(tmp_path / "run_stats.csv")
    for hop in ("a", "b", "return"):
        assert int(stat(stats, "hop", hop)["Request Count"]) >= 8
    assert int(stat(stats, "session", "connect")["Request Count"]) >= 4
    assert int(stat(stats, "send", "lag")["Request Count"]) >= 4
    hops = {r["Hop"]: r for r in read_csv(tmp_path / "run_hops.csv")}
    assert list(hops)[:3] == ["a", "b", "return"]
    for name, want in (("a", 20.0), ("b", 55.0)):
        h = hops[name]
        assert int(h["Detected"]) >= 0.9 * (int(h["Markers sent"]) - int(h["Pending"])) > 0
        assert abs(float(h["p50 ms"]) - want) < 5.0, h
    assert abs(float(hops["b"]["own p50 ms"]) - 35.0) < 5.0, hops["b"]
    # Exact values: not Locust's two significant digits.
    assert float(hops["a"]["p50 ms"]) != round(float(hops["a"]["p50 ms"]))
    assert float(hops["send lag"]["p50 ms"]) < 5.0
    assert "started" in hops["sessions"]["Note"]


def test_open_model_counts_sessions_that_could_not_start(tmp_path: Path) -> None:
    with pipeline("a:20ms") as (url, _):
        res = run_locust(
            ["-f", OPEN, "--headless", "-u", "1", "-r", "1", "-t", "6s", "--host", url,
             "--csv", str(tmp_path / "run")],
            locust_env(PROBE_SESSION_RATE="4", PROBE_MAX_IN_FLIGHT="2", PROBE_SESSION_S="2"),
        )
    # Sessions that could not start are failures, so Locust exits 1.
    assert res.returncode == 1, res.stderr[-3000:]
    stats = read_csv(tmp_path / "run_stats.csv")
    starts = stat(stats, "session", "start")
    assert int(starts["Failure Count"]) >= 5
    connects = int(stat(stats, "session", "connect")["Request Count"])
    # 4 a second for ~6 s were scheduled; at most 2 in flight of 2 s each ran.
    assert 4 <= connects <= 10
    assert int(stat(stats, "hop", "a")["Request Count"]) >= 5
    failures = read_csv(tmp_path / "run_failures.csv")
    assert any("already in flight" in f["Error"] for f in failures)
    hops = {r["Hop"]: r for r in read_csv(tmp_path / "run_hops.csv")}
    note = hops["sessions"]["Note"]
    late = int(note.split("late starts ")[1].split(",")[0])
    assert late == int(starts["Failure Count"])


def test_target_down_during_a_run_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    with pipeline("a:20ms") as (url, proc):
        run = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", REFERENCE, "--headless", "-u", "2", "-r",
             "2", "-t", "8s", "--host", url, "--csv", str(tmp_path / "run")],
            cwd=ROOT,
            env=locust_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4.0 * SLOW)
        proc.send_signal(signal.SIGKILL)
        out, err = run.communicate(timeout=40 * SLOW)
    assert run.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    stats = read_csv(tmp_path / "run_stats.csv")
    assert int(stat(stats, "hop", "a")["Request Count"]) >= 4  # measured before the fault
    connect = stat(stats, "session", "connect")
    assert int(connect["Failure Count"]) >= 2  # retried after the fault, until the end
    failures = " ".join(f["Error"] for f in read_csv(tmp_path / "run_failures.csv"))
    assert "cannot connect" in failures
    assert "target closed the connection" in failures or "stream ended" in failures


def test_a_sink_port_already_taken_is_one_sentence_and_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_locust(
            ["-f", REFERENCE, "--headless", "-u", "1", "-t", "3s",
             "--host", "ws://127.0.0.1:9/"],
            locust_env(PROBE_SINK_LISTEN=f"127.0.0.1:{port}"),
            timeout=30,
        )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "sink" in ln]
    assert lines == [
        f"The probe sink cannot listen on 127.0.0.1:{port}: the port is already in use."
    ]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_master_and_two_workers_merge_hop_stats_in_the_hops_tab(tmp_path: Path) -> None:
    web, bind = free_port(), free_port()
    while bind == web:  # two releases of port 0 may hand out the same number
        bind = free_port()
    env = locust_env(PROBE_HOP_ORDER="a,return")
    procs: list[subprocess.Popen[str]] = []
    with pipeline("a:20ms") as (url, _):
        try:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", REFERENCE, "--master",
                 "--master-bind-host", "127.0.0.1", "--master-bind-port", str(bind),
                 "--web-host", "127.0.0.1", "--web-port", str(web), "--autostart",
                 # The master outlives the polling below even on a loaded machine (it quits
                 # --autoquit s after its -t run, and the workers may take a while to report).
                 "--expect-workers", "2", "-u", "4", "-r", "4", "-t", f"{int(12 * SLOW)}s",
                 "--autoquit", str(int(15 * SLOW)),
                 "--host", url, "--csv", str(tmp_path / "master")],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            ))
            wait_port(bind)
            for _ in range(2):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "locust", "-f", REFERENCE, "--worker",
                     "--master-host", "127.0.0.1", "--master-port", str(bind)],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    text=True,
                ))
            wait_port(web)
            deadline = time.monotonic() + 30 * SLOW
            seen: dict[str, Any] = {}
            while time.monotonic() < deadline:
                try:
                    data = _get_json(f"http://127.0.0.1:{web}/hops/json")
                except OSError as exc:
                    master = procs[0]
                    if master.poll() is None:
                        raise
                    err = master.stderr.read() if master.stderr else ""
                    pytest.fail(f"the master exited ({master.returncode}) while polled "
                                f"({exc}); its stderr ends: {err[-3000:]}")
                seen = {
                    wid: src for wid, src in data["sources"].items()
                    if src["markers"].get("a", {}).get("detected", 0) > 0
                }
                if len(seen) == 2:
                    break
                time.sleep(0.5)
            assert len(seen) == 2, data
            rows = {r["name"]: r for r in data["rows"]}
            both = sum(src["markers"]["a"]["detected"] for src in seen.values())
            assert rows["a"]["detected"] == both
            assert abs(rows["a"]["p50"] - 20.0) < 5.0
            # The same rows ride on /stats/requests for the Hops tab of the web UI.
            ui = _get_json(f"http://127.0.0.1:{web}/stats/requests")
            tab = next(t for t in ui["extended_stats"] if t["key"] == "hops")
            assert [r["name"] for r in tab["data"]][:2] == ["a", "return"]
            assert procs[0].wait(timeout=40 * SLOW) in (0, 1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
    hops = {r["Hop"]: r for r in read_csv(tmp_path / "master_hops.csv")}
    assert int(hops["a"]["Detected"]) >= both
    assert "workers reporting 2" in hops["sessions"]["Note"]


@pytest.mark.parametrize("processes", [2])
def test_processes_flag_runs_a_sink_per_worker(tmp_path: Path, processes: int) -> None:
    with pipeline("a:20ms") as (url, _):
        res = run_locust(
            ["-f", REFERENCE, "--headless", "--processes", str(processes), "-u", "2", "-r", "2",
             "-t", "6s", "--host", url, "--csv", str(tmp_path / "run"), "--loglevel", "INFO"],
            locust_env(PROBE_HOP_ORDER="a,return"),
        )
    assert res.returncode == 0, res.stderr[-3000:]
    sinks = {ln.split("probe sink for this process: ")[1].strip()
             for ln in res.stderr.splitlines() if "probe sink for this process" in ln}
    assert len(sinks) == processes
    hops = {r["Hop"]: r for r in read_csv(tmp_path / "run_hops.csv")}
    assert int(hops["a"]["Detected"]) > 0
    assert "workers reporting 2" in hops["sessions"]["Note"]


def test_metrics_of_a_locust_worker_are_the_probe_run_metrics(tmp_path: Path) -> None:
    port = free_port()
    with pipeline("a:20ms") as (url, _):
        run = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", REFERENCE, "--headless", "-u", "2", "-r", "2",
             "-t", "7s", "--host", url],
            cwd=ROOT,
            env=locust_env(PROBE_METRICS_LISTEN=f"127.0.0.1:{port}", PROBE_HOP_ORDER="a,return"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20 * SLOW
            count = 0.0
            while time.monotonic() < deadline and count == 0.0:
                time.sleep(0.5)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        text = r.read().decode()
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("probe_hop_latency_seconds_count{") and 'hop="a"' in line:
                        count = float(line.rsplit(" ", 1)[1])
            assert count > 0
        finally:
            _, err = run.communicate(timeout=40 * SLOW)
    assert "Traceback" not in err


def test_a_worker_that_dies_is_shown_lost_and_the_run_goes_on(tmp_path: Path) -> None:
    """Kill one of two workers mid-run: the master marks it lost in the Hops tab, and the other
    worker's measurements keep arriving."""
    web, bind = free_port(), free_port()
    env = locust_env(PROBE_HOP_ORDER="a,return")
    procs: list[subprocess.Popen[str]] = []
    with pipeline("a:20ms") as (url, _):
        try:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", REFERENCE, "--master",
                 "--master-bind-host", "127.0.0.1", "--master-bind-port", str(bind),
                 "--web-host", "127.0.0.1", "--web-port", str(web), "--autostart",
                 "--expect-workers", "2", "-u", "4", "-r", "4", "-t", "25s", "--autoquit", "2",
                 "--host", url],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            ))
            wait_port(bind)
            for _ in range(2):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "locust", "-f", REFERENCE, "--worker",
                     "--master-host", "127.0.0.1", "--master-port", str(bind)],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    text=True,
                ))
            wait_port(web)

            def hops() -> dict[str, Any]:
                return _get_json(f"http://127.0.0.1:{web}/hops/json")

            deadline = time.monotonic() + 30 * SLOW
            data = hops()
            while time.monotonic() < deadline:
                data = hops()
                live = [s for s in data["sources"].values()
                        if s["markers"].get("a", {}).get("detected", 0) > 0]
                if len(live) == 2:
                    break
                time.sleep(0.5)
            assert len(live) == 2, data
            procs[2].kill()  # one worker dies without a word to the master
            procs[2].wait(10)
            deadline = time.monotonic() + 30 * SLOW
            note = ""
            while time.monotonic() < deadline:
                data = hops()
                note = str(data["rows"][-1]["note"])
                if "workers lost 1" in note:
                    break
                time.sleep(0.5)
            assert "workers lost 1" in note, data["rows"][-1]
            before = {r["name"]: r["detected"] for r in data["rows"]}["a"]
            deadline = time.monotonic() + 20 * SLOW
            after = before
            while time.monotonic() < deadline and after <= before:
                time.sleep(1.0)
                after = {r["name"]: r["detected"] for r in hops()["rows"]}["a"]
            assert after > before, (before, after)
            assert procs[1].poll() is None  # the surviving worker is still running
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()


def test_reply_mode_from_the_environment_times_each_answer(tmp_path: Path) -> None:
    """PROBE_REPLY turns a closed-loop user into reply mode; each utterance becomes a
    ``reply`` / ``voice`` entry timed by the scripted bot (answers 300 ms after an utterance)."""
    peer = subprocess.Popen([sys.executable, str(ROOT / "tests" / "scripted_peer.py"), "serve"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None
        url = f"ws://127.0.0.1:{int(peer.stdout.readline())}/bot"
        res = run_locust(
            ["-f", REFERENCE, "--headless", "-u", "1", "-r", "1", "-t", "8s", "--host", url,
             "--csv", str(tmp_path / "run"), "--exit-code-on-error", "0"],
            locust_env(PROBE_REPLY="yes", PROBE_UTTERANCE_S="1", PROBE_GAP_S="1.5",
                       PROBE_SESSION_S="5", PROBE_NO_SINK="1"),
        )
    finally:
        peer.kill()
        peer.wait()
    assert res.returncode == 0, res.stderr[-3000:]
    voice = stat(read_csv(tmp_path / "run_stats.csv"), "reply", "voice")
    assert int(voice["Request Count"]) >= 2 and int(voice["Failure Count"]) == 0, voice
    # The bot takes 25 silent frames (0.5 s) to hear the utterance end, then answers 0.3 s
    # later; the onset rule adds a frame or two.
    assert 780.0 <= float(voice["Median Response Time"]) <= 900.0, voice


def test_text_results_and_barge_in_from_the_environment(tmp_path: Path) -> None:
    """PROBE_RESULTS makes each text result a ``result`` entry and each utterance's figures
    ``conversation`` entries (the reference text hop: interims 150 ms after their audio);
    PROBE_BARGE_IN interrupts the reference reply bot (it stops 100 ms after the caller)."""
    with pipeline("stt:150ms:text") as (url, _):
        res = run_locust(
            ["-f", REFERENCE, "--headless", "-u", "1", "-r", "1", "-t", "10s", "--host", url,
             "--csv", str(tmp_path / "stt"), "--exit-code-on-error", "0"],
            locust_env(PROBE_RESULTS="seed", PROBE_GAP_S="1", PROBE_SESSION_S="8",
                       PROBE_NO_SINK="1"),
        )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_csv(tmp_path / "stt_stats.csv")
    interim = stat(rows, "result", "interim")
    assert int(interim["Request Count"]) >= 5 and int(interim["Failure Count"]) == 0, interim
    # Locust's median is rounded to two significant figures.
    assert 140.0 <= float(interim["Median Response Time"]) <= 170.0, interim
    delay = stat(rows, "conversation", "final_delay")
    assert int(delay["Request Count"]) >= 2, delay
    assert 390.0 <= float(delay["Median Response Time"]) <= 420.0, delay
    with pipeline("bot:500ms:reply:stop=100ms") as (url, _):
        res = run_locust(
            ["-f", REFERENCE, "--headless", "-u", "1", "-r", "1", "-t", "12s", "--host", url,
             "--csv", str(tmp_path / "bot"), "--exit-code-on-error", "0"],
            locust_env(PROBE_REPLY="1", PROBE_BARGE_IN="0.5", PROBE_UTTERANCE_S="3",
                       PROBE_GAP_S="4", PROBE_SESSION_S="10", PROBE_NO_SINK="1"),
        )
    assert res.returncode == 0, res.stderr[-3000:]
    barge = stat(read_csv(tmp_path / "bot_stats.csv"), "conversation", "barge_in")
    assert int(barge["Request Count"]) >= 1 and int(barge["Failure Count"]) == 0, barge
    assert 95.0 <= float(barge["Median Response Time"]) <= 130.0, barge


def test_a_bad_environment_value_is_one_sentence_and_exit_code_2() -> None:
    res = run_locust(
        ["-f", REFERENCE, "--headless", "-u", "1", "-r", "1", "-t", "3s",
         "--host", "ws://127.0.0.1:9/"],
        locust_env(PROBE_RATE="8k"),
    )
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last == "PROBE_RATE must be an integer from 8000 to 48000, got '8k'.", res.stderr
    assert "Traceback" not in res.stderr


def test_an_overloaded_worker_says_so_and_blames_no_hop(tmp_path: Path) -> None:
    """With its CPU bound set absurdly low the worker counts as overloaded from its first second:
    the log says so, the Hops tab leads with a WARNING row, and the markers a stalled hop owes
    are unmeasured, not the hop's failures."""
    with pipeline("a:20ms:stall@1") as (url, _):
        res = run_locust(
            ["-f", REFERENCE, "--headless", "-u", "2", "-r", "2", "-t", "8s", "--host", url,
             "--csv", str(tmp_path / "run"), "--exit-code-on-error", "0"],
            locust_env(PROBE_HOP_ORDER="a,return", PROBE_OVERLOAD_CPU="0.001"),
        )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "probe: WARNING: this Locust process is overloaded (" in res.stderr, res.stderr
    hops = {r["Hop"]: r for r in read_csv(tmp_path / "run_hops.csv")}
    assert "WARNING" in hops and "unmeasured, not missed" in hops["WARNING"]["Note"]
    a = hops["a"]
    assert int(a["Unmeasured"]) > 0 and int(a["Missed"]) == 0, a
    stats = read_csv(tmp_path / "run_stats.csv")
    assert int(stat(stats, "hop", "a")["Failure Count"]) == 0
    assert int(stat(stats, "generator", "overloaded")["Failure Count"]) > 0
