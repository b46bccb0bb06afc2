"""The measurement chain end to end over loopback: source, reference pipeline, sink, report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import SLOW, BackgroundPipeline, free_port
from websockets.asyncio.server import ServerConnection, serve

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig
from probe.cli import main
from probe.pipeline import ReferencePipeline, parse_hops


def _run(target: str, **kw: Any) -> dict[str, Any]:
    src = SourceConfig(target=target, duration_s=kw.pop("duration_s", 3.0), drain_s=1.0)
    cfg = RunConfig(source=src, marker_timeout_s=kw.pop("marker_timeout_s", 3.0), **kw)
    return asyncio.run(run_probe(cfg))


def _hop(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(h for h in report["hops"] if h["name"] == name)


def test_pipeline_hops_measure_their_configured_delays() -> None:
    hops = parse_hops("a:20ms,b:35ms:mulaw8k,c:120ms")

    async def go() -> dict[str, Any]:
        pipeline = ReferencePipeline(hops)
        url = await pipeline.start("127.0.0.1", 0)
        try:
            src = SourceConfig(target=url, duration_s=4.0, drain_s=1.0)
            cfg = RunConfig(
                source=src,
                sessions=2,
                concurrency=2,
                hop_order=["a", "b", "c", "return"],
                marker_timeout_s=3.0,
            )
            return await run_probe(cfg)
        finally:
            await pipeline.stop()

    report = asyncio.run(go())
    assert [h["name"] for h in report["hops"]] == ["a", "b", "c", "return"]
    expected = {"a": 20.0, "b": 55.0, "c": 175.0}
    for name, want in expected.items():
        hop = _hop(report, name)
        m = hop["markers"]
        assert m["sent"] == m["detected"] + m["missed"]
        assert m["detected"] >= 0.9 * m["sent"] > 0
        assert abs(hop["latency_ms"]["p50"] - want) < 4.0, (name, hop["latency_ms"])
    own_c = _hop(report, "c")["own_latency_ms"]["p50"]
    assert abs(own_c - 120.0) < 4.0
    assert report["sessions"]["completed"] == 2
    assert report["schema"] == "probe.report/v1"
    # A light run: the probe kept up, and says how it knows.
    assert report["generator"]["overloaded"] is False and report["generator"]["frames"] > 300
    assert report["series"]
    assert {"hop", "session", "marker", "send_time"} <= set(report["series"][0])


def test_echo_return_hop_and_accounting() -> None:
    async def echo(ws: ServerConnection) -> None:
        async for m in ws:
            if isinstance(m, bytes):
                await ws.send(m)

    async def go() -> dict[str, Any]:
        async with serve(echo, "127.0.0.1", 0) as srv:
            port = next(iter(srv.sockets)).getsockname()[1]
            src = SourceConfig(target=f"ws://127.0.0.1:{port}/ws/{{session}}", duration_s=3.0)
            return await run_probe(RunConfig(source=src, sessions=2, concurrency=2))

    report = asyncio.run(go())
    ret = _hop(report, "return")
    assert ret["markers"]["sent"] == ret["markers"]["detected"] + ret["markers"]["missed"]
    assert ret["markers"]["detected"] >= ret["markers"]["sent"] - 1
    assert ret["latency_ms"]["p99"] < 20.0




def test_unreachable_target_is_a_failed_session_not_a_crash() -> None:
    report = _run(f"ws://127.0.0.1:{free_port()}/", sessions=2, concurrency=2)
    assert report["sessions"]["failed"] == 2
    assert all("cannot connect" in e["error"] for e in report["sessions"]["errors"])


def test_refused_start_is_reported_with_its_reason() -> None:
    async def refuse(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.close(1008, "unknown tenant")

    async def go() -> dict[str, Any]:
        async with serve(refuse, "127.0.0.1", 0) as srv:
            port = next(iter(srv.sockets)).getsockname()[1]
            src = SourceConfig(target=f"ws://127.0.0.1:{port}/", duration_s=2.0)
            return await run_probe(RunConfig(source=src, marker_timeout_s=1.0))

    report = asyncio.run(go())
    assert report["sessions"]["failed"] == 1
    err = report["sessions"]["errors"][0]["error"]
    assert "1008" in err and "unknown tenant" in err


def test_cli_run_writes_report_and_rejects_bad_usage(tmp_path: Any, capsys: Any) -> None:
    assert main(["run", "--target", "http://x", "--duration", "2"]) == 2
    assert "ws://" in capsys.readouterr().err
    out = tmp_path / "r.json"
    port = free_port()
    assert main(["run", "--target", f"ws://127.0.0.1:{port}/", "--duration", "1",
                 "--marker-timeout", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["sessions"]["failed"] == 1


# -- a run cut short by a signal: a partial report marked interrupted, every marker accounted.

def _interrupt(argv: list[str], sig: int, tmp_path: Any, *, after_s: float = 3.0,
               wrap: list[str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """Start ``probe ARGV`` in its own process group, send ``sig`` to the whole group
    ``after_s`` in (as a terminal's Ctrl-C or ``timeout`` does, the sink child included), and
    return the finished process and how long it took after the signal."""
    cmd = [*(wrap or []), sys.executable, "-m", "probe.cli", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)
    t_sig = time.monotonic()
    if wrap is None:
        time.sleep(after_s * SLOW)
        t_sig = time.monotonic()
        os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60 * SLOW)
    took = time.monotonic() - t_sig
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 0)
        raise AssertionError("a process of the run outlived it (the sink child?)")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), took


def _partial(report: dict[str, Any], signal_name: str) -> None:
    cut = report["interrupted"]
    assert cut["signal"] == signal_name and 1.0 < cut["after_s"] < 8.0 * SLOW
    assert report["sessions"]["started"] == 2 and report["sessions"]["completed"] == 0
    assert report["sessions"]["open"] == 2  # cut short, not failed by the target
    unmeasured = 0
    for hop in report["hops"]:
        m = hop["markers"]
        assert m["sent"] > 0 and m["detected"] > 0, hop
        # Every marker sent is accounted for: settled, and listed in the series.
        assert m["sent"] == m["detected"] + m["missed"] + m["unmeasured"], hop
        rows = [r for r in report["series"] if r["hop"] == hop["name"]]
        assert len(rows) == m["sent"]
        unmeasured += m["unmeasured"]
    assert {h["name"] for h in report["hops"]} == {"a", "b", "c", "return"}
    assert unmeasured >= cut["unmeasured"]


RUN = ["--duration", "20", "--sessions", "2", "--concurrency", "2", "--marker-timeout", "5",
       "--hop-order", "a,b,c,return", "--json", "r.json"]


@pytest.mark.parametrize("command, sig, code", [
    ("run", signal.SIGINT, 130),
    ("run", signal.SIGTERM, 143),
    ("canary", signal.SIGTERM, 143),
])
def test_a_signal_mid_run_writes_a_partial_report_and_exits_128_plus_it(
    command: str, sig: signal.Signals, code: int, tmp_path: Any
) -> None:
    pipe = BackgroundPipeline("a:20ms,b:35ms:mulaw8k,c:120ms")
    try:
        extra = ["--junit", "j.xml", "--threshold", "markers>=99%"] if command == "canary" else []
        res, took = _interrupt([command, "--target", pipe.url, *RUN, *extra], sig, tmp_path)
    finally:
        pipe.close()
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"probe: interrupted by {sig.name} after ")
    assert res.stdout.startswith(f"INTERRUPTED by {sig.name}")
    assert took < 12.0 * SLOW  # not the 20 s sessions, nor the marker timeout on top
    _partial(json.loads((tmp_path / "r.json").read_text()), sig.name)
    if command == "canary":
        junit = (tmp_path / "j.xml").read_text()
        assert f'<failure message="interrupted by {sig.name} after' in junit
        assert "canary: INTERRUPTED" in res.stdout


@pytest.mark.skipif(shutil.which("timeout") is None, reason="coreutils timeout")
def test_timeout_gets_a_partial_report_without_tracebacks(tmp_path: Any) -> None:
    pipe = BackgroundPipeline("a:20ms,b:35ms:mulaw8k,c:120ms")
    try:
        wrap = ["timeout", "-s", "INT", f"{3.0 * SLOW:g}"]
        res, _ = _interrupt(["run", "--target", pipe.url, *RUN], signal.SIGINT, tmp_path,
                            wrap=wrap)
    finally:
        pipe.close()
    assert res.returncode == 124  # timeout's own code for "timed out"
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr
    _partial(json.loads((tmp_path / "r.json").read_text()), "SIGINT")


@pytest.mark.parametrize("sink_process", [True, False])
def test_a_hop_that_stalls_mid_session_is_named_stalled_with_when_it_stopped(
    sink_process: bool,
) -> None:
    """A hop that stops forking while the session keeps sending: its later markers are missed
    and the hop gets one error per session, `stalled`, saying when its audio stopped; the hop
    before it is unaffected."""
    hops = parse_hops("a:20ms,b:20ms:stall@2s")

    async def go() -> dict[str, Any]:
        pipeline = ReferencePipeline(hops)
        url = await pipeline.start("127.0.0.1", 0)
        try:
            src = SourceConfig(target=url, duration_s=5.0, drain_s=1.0)
            cfg = RunConfig(source=src, hop_order=["a", "b", "return"], marker_timeout_s=2.0,
                            sink_process=sink_process)
            return await run_probe(cfg)
        finally:
            await pipeline.stop()

    report = asyncio.run(go())
    a, b = _hop(report, "a"), _hop(report, "b")
    assert a["markers"]["missed"] == 0 and not a["errors"]
    assert b["markers"]["missed"] >= 4
    stalled = [e for e in b["errors"] if e["error"].startswith("stalled")]
    assert len(stalled) == 1, b["errors"]
    # "... sent no audio after 2.0x s of the session ..."
    after = float(stalled[0]["error"].split("after ")[1].split(" s")[0])
    assert 1.8 <= after <= 2.4, stalled[0]["error"]


def test_a_hop_that_pauses_without_losing_markers_is_not_called_stalled() -> None:
    """Silence alone is no error: a fork that pauses between markers and whose markers all
    arrive gets no stall error (a hop that forks only speech may pause)."""
    from probe.measure.registry import SessionRegistry

    t = [100.0]
    reg = SessionRegistry(clock=lambda: t[0])
    reg.marker_timeout = 1.0
    reg.open_session("s1")
    reg.hop_connected("h", "s1")
    reg.record_send("s1", 0, 100.0)
    reg.hop_silent("h", "s1", 100.5)  # silent after the marker went out ...
    t[0] = 102.0
    reg.expire()  # ... and the marker is missed, but it was sent before the silence
    assert not reg.hop_errors().get("h")
    reg.hop_silent("h", "s1", None)
    reg.record_send("s1", 1, 102.0)
    reg.hop_silent("h", "s1", 101.9)
    t[0] = 104.0
    reg.expire()
    errors = reg.hop_errors()["h"]
    assert len(errors) == 1 and errors[0].error.startswith("stalled")


def _sink_child_of(pid: int) -> int:
    """The pid of the `python -m probe.aio.sinkproc` child of process ``pid``."""
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
        if ppid == pid and b"probe.aio.sinkproc" in cmd:
            return int(entry)
    raise AssertionError(f"no sink child under pid {pid}")


@pytest.mark.parametrize("command, code", [("run", 3), ("canary", 2)])
def test_a_dead_sink_child_ends_the_run_invalid(command: str, code: int, tmp_path: Any) -> None:
    """kill -9 of the sink child mid-run: the run ends within a few seconds, one sentence on
    stderr, the report marked invalid, and nothing blamed on the target (markers owed after the
    death are unmeasured, none missed; every marker sent accounted for). `probe run` exits 3;
    the canary has no verdict (UNKNOWN, 2)."""
    pipe = BackgroundPipeline("a:20ms,b:35ms:mulaw8k")
    extra = ["--threshold", "markers>=99%"] if command == "canary" else []
    try:
        argv = [sys.executable, "-m", "probe.cli", command, "--target", pipe.url, "--duration",
                "20", "--sessions", "2", "--concurrency", "2", "--marker-timeout", "5",
                "--hop-order", "a,b,return", "--json", "r.json", *extra]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path)
        time.sleep(3.0 * SLOW)
        os.kill(_sink_child_of(proc.pid), signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=60 * SLOW)
        took = time.monotonic() - t_kill
    finally:
        pipe.close()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert "killed by SIGKILL" in err
    if command == "run":
        assert err.strip().splitlines()[-1].startswith("probe: the run is invalid after "), err
        assert out.startswith("INVALID after ")
    else:
        assert "canary: UNKNOWN" in out, out
    assert took < 10.0 * SLOW  # not the rest of the 20 s sessions
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["invalid"]["reason"].startswith("the probe's sink child process")
    assert report["generator"]["overloaded"]
    for hop in report["hops"]:
        m = hop["markers"]
        assert m["missed"] == 0, hop
        assert m["sent"] == m["detected"] + m["missed"] + m["unmeasured"], hop
        assert m["unmeasured"] > 0, hop
