"""The measurement chain end to end over loopback: source, reference pipeline, sink, report."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import free_port
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
