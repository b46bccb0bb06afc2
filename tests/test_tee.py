"""probe tee between real peers on loopback: what it relays (handshake, subprotocols, messages,
close codes), how it fails (unreachable, refusing and dropping upstreams, a client that never
sends start), what it forks (both dialects, byte for byte, session and trace context from the
start or the handshake), and the whole chain: probe run -> probe tee -> probe pipeline."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import SLOW, free_port, wait_port
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig
from probe.aio.tee import Tee
from probe.canary.scenario import load_scenario
from probe.cli import main
from probe.pipeline import ReferencePipeline
from probe.protocol import TraceContext, parse_traceparent

ROOT = Path(__file__).resolve().parent.parent
TRACE = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
AUDIO16 = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}
AUDIO8 = {"encoding": "pcm_s16le", "sample_rate": 8000, "channels": 1}


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60 * SLOW))  # type: ignore[arg-type]


class Recorder:
    """A fork sink that records every connection's path and frames (a real peer, no probe code)."""

    def __init__(self) -> None:
        self.forks: list[dict[str, Any]] = []
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        fork: dict[str, Any] = {"path": ws.request.path if ws.request else "", "frames": []}
        self.forks.append(fork)
        try:
            async for frame in ws:
                fork["frames"].append(frame)
        except ConnectionClosed:
            pass
        fork["code"] = ws.close_code

    def by_hop(self) -> dict[str, dict[str, Any]]:
        return {json.loads(f["frames"][0])["hop"]: f for f in self.forks if f["frames"]}


async def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds * SLOW
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


# --- relaying ------------------------------------------------------------------------------------


def test_the_handshake_messages_and_closes_pass_through_unchanged() -> None:
    requests: list[Request] = []
    received: list[list[object]] = []
    closes: list[tuple[int | None, str | None]] = []

    def record(connection: ServerConnection, request: Request) -> None:
        requests.append(request)

    def pick(connection: ServerConnection, offered: Any) -> Any:
        return "chat.v1" if "chat.v1" in offered else None

    def extra(connection: ServerConnection, request: Request, response: Response) -> None:
        response.headers["X-Upstream"] = "yes"
        response.headers["Set-Cookie"] = "a=1"
        response.headers["Set-Cookie"] = "b=2"

    async def upstream(ws: ServerConnection) -> None:
        got: list[object] = []
        received.append(got)
        try:
            while True:
                fragments = [f async for f in ws.recv_streaming()]
                got.append(fragments[0] if len(fragments) == 1 else fragments)
                if fragments == ["close-me"]:
                    await ws.close(4001, "custom reason é")
                    return
                # An echo, kind for kind and fragment for fragment.
                await ws.send(fragments[0] if len(fragments) == 1 else fragments)
        except ConnectionClosed:
            pass
        closes.append((ws.close_code, ws.close_reason))

    big = os.urandom(2 * 1024 * 1024)
    messages: list[str | bytes] = ["héllo ☃", b"\x00\x01\xff", big, '{"type": "x"}', b""]

    async def go() -> None:
        async with serve(upstream, "127.0.0.1", 0, process_request=record,
                         select_subprotocol=pick, process_response=extra, max_size=None) as up:
            port = up.sockets[0].getsockname()[1]
            tee = Tee(f"ws://127.0.0.1:{port}/base", hop="link")
            url = await tee.start()
            try:
                async with connect(
                    url + "a/b?x=1&y=%20z",
                    subprotocols=["chat.v2", "chat.v1"],  # type: ignore[list-item]
                    additional_headers=[("X-Custom", "1"), ("Authorization", "Bearer t"),
                                        ("X-Custom", "2")],
                    origin="http://example.test",  # type: ignore[arg-type]
                    user_agent_header="test-agent/1",
                    max_size=None,
                ) as ws:
                    assert ws.subprotocol == "chat.v1"
                    assert ws.response is not None
                    assert ws.response.headers["X-Upstream"] == "yes"
                    assert ws.response.headers.get_all("Set-Cookie") == ["a=1", "b=2"]
                    for m in messages:
                        await ws.send(m)
                        assert await ws.recv() == m  # same value, same kind (str or bytes)
                    await ws.send(["frag", "ment", "ed"])  # three frames, one message
                    assert await ws.recv() == "fragmented"
                    await ws.send("close-me")
                    with pytest.raises(ConnectionClosed):
                        await ws.recv()
                    assert (ws.close_code, ws.close_reason) == (4001, "custom reason é")
                # The other way: the client's close code and reason reach the upstream.
                async with connect(url) as ws:
                    await ws.send("hi")
                    await ws.recv()
                    await ws.close(4002, "bye")
                # And a close frame with no code at all stays one.
                async with connect(url) as ws:
                    await ws.close(cast(int, None))
                await wait_for(lambda: len(closes) == 2)
            finally:
                await tee.stop()
            assert tee.stats.to_upstream == len(messages) + 3

    run(go())
    r = requests[0]
    assert r.path == "/base/a/b?x=1&y=%20z"
    assert r.headers.get_all("X-Custom") == ["1", "2"]
    assert r.headers["Authorization"] == "Bearer t"
    assert r.headers["Origin"] == "http://example.test"
    assert r.headers["User-Agent"] == "test-agent/1"
    assert r.headers["Sec-WebSocket-Protocol"] == "chat.v2, chat.v1"
    assert len(r.headers.get_all("Host")) == 1 and len(r.headers.get_all("Upgrade")) == 1
    # websockets ends a fragmented send with an empty final frame: four frames, passed as such.
    assert received[0] == [*messages, ["frag", "ment", "ed", ""], "close-me"]
    assert closes == [(4002, "bye"), (1005, "")]


def test_unreachable_refusing_and_failing_upstreams(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="probe.tee")
    port = free_port()

    async def refuse(connection: ServerConnection, request: Request) -> Response:
        return Response(403, "Forbidden", Headers([("X-Why", "token"), ("Content-Length", "8")]),
                        b"go away\n")

    async def failing(ws: ServerConnection) -> None:
        message = await ws.recv()
        if message == "drop":
            ws.transport.abort()  # no close frame
        else:
            await ws.close(1011, "hop model failed")

    async def go() -> None:
        tee = Tee(f"ws://127.0.0.1:{port}/", hop="link")
        url = await tee.start()
        try:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 502
            assert b"unreachable" in refused.value.response.body
            # The tee goes on: once the upstream listens, clients get through.
            async with serve(refuse, "127.0.0.1", port, process_request=refuse):
                with pytest.raises(InvalidStatus) as forbidden:
                    async with connect(url):
                        pass
            r = forbidden.value.response
            assert (r.status_code, r.headers["X-Why"], r.body) == (403, "token", b"go away\n")
            async with serve(failing, "127.0.0.1", port):
                async with connect(url) as ws:
                    await ws.send("close")
                    with pytest.raises(ConnectionClosed):
                        await ws.recv()
                    assert (ws.close_code, ws.close_reason) == (1011, "hop model failed")
                async with connect(url) as ws:
                    await ws.send("drop")
                    with pytest.raises(ConnectionClosed) as dropped:
                        await ws.recv()
                    assert dropped.value.rcvd is None  # dropped here too: 1006
        finally:
            await tee.stop()
        assert tee.stats.upstream_failures == 2 and tee.stats.connections == 2

    run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "probe.tee"]
    assert any(f"upstream ws://127.0.0.1:{port}/ is unreachable for client" in s
               and "answered HTTP 502" in s for s in lines), lines
    assert any("answered the handshake of client" in s and "HTTP 403; passed on" in s
               for s in lines), lines
    assert any("the upstream closed with 1011 (hop model failed); closing client" in s
               for s in lines), lines
    assert any("the upstream closed without a close frame" in s for s in lines), lines
    assert not [r for r in caplog.records if r.exc_info]


def test_the_command_refuses_bad_options_in_one_sentence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tee", "--upstream", "http://x/", "--hop", "t"]) == 2
    assert main(["tee", "--upstream", "ws://127.0.0.1:9/", "--hop", "a b"]) == 2
    assert main(["tee", "--upstream", "ws://127.0.0.1:9/", "--hop", "t", "--listen", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("probe: --upstream must be a ws:// or wss:// URL")
    assert err[1].startswith("probe: --hop must be 1-57 characters")
    assert err[2].startswith("probe: --listen must be HOST:PORT")
    assert "Traceback" not in "".join(err)


# --- forking -------------------------------------------------------------------------------------


def test_a_client_that_never_sends_start_is_relayed_but_not_forked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="probe.tee")
    sink = Recorder()

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def go() -> None:
        async with serve(echo, "127.0.0.1", 0) as up, serve(sink.handler, "127.0.0.1", 0) as s:
            sink_url = f"ws://127.0.0.1:{s.sockets[0].getsockname()[1]}/sink"
            tee = Tee(f"ws://127.0.0.1:{up.sockets[0].getsockname()[1]}/", hop="link",
                      sink=sink_url)
            url = await tee.start()
            try:
                async with connect(url) as ws:
                    for i in range(20):
                        await ws.send(bytes([i]) * 640)
                    back = [await ws.recv() for _ in range(20)]
                assert back == [bytes([i]) * 640 for i in range(20)]  # nothing lost
            finally:
                await tee.stop()

    run(go())
    assert sink.forks == []
    lines = [r.getMessage() for r in caplog.records if r.name == "probe.tee"]
    assert len([s for s in lines if "sent no start first" in s]) == 1, lines
    assert "its first message was binary" in lines[0]


def test_probe_dialect_forks_both_ways_byte_for_byte_to_the_sink_the_start_names() -> None:
    sink = Recorder()
    ups = [bytes([100 + i]) * 320 for i in range(5)]
    downs = [bytes([i]) * 640 for i in range(5)]

    async def pipeline(ws: ServerConnection) -> None:
        await ws.recv()  # the start
        await ws.send(json.dumps({"type": "start", "audio": AUDIO8}))
        for d in ups:
            await ws.recv()
            await ws.send(d)
        await ws.recv()  # stop
        await ws.send('{"type": "stop"}')
        await ws.close()

    async def go() -> None:
        async with serve(pipeline, "127.0.0.1", 0) as up, serve(sink.handler, "127.0.0.1", 0) as s:
            sink_url = f"ws://127.0.0.1:{s.sockets[0].getsockname()[1]}/sink?cap=x"
            tee = Tee(f"ws://127.0.0.1:{up.sockets[0].getsockname()[1]}/", hop="edge")
            url = await tee.start()
            try:
                async with connect(url) as ws:
                    await ws.send(json.dumps({"type": "start", "session": "sess-9",
                                              "traceparent": str(TRACE), "audio": AUDIO16,
                                              "sink": sink_url}))
                    await ws.recv()  # the pipeline's own start
                    for d in downs:
                        await ws.send(d)
                        await ws.recv()
                    await ws.send('{"type": "stop"}')
                    await ws.recv()
                await wait_for(lambda: len(sink.forks) == 2 and all("code" in f
                                                                   for f in sink.forks))
            finally:
                await tee.stop()

    run(go())
    forks = sink.by_hop()
    assert set(forks) == {"edge", "edge.return"}
    for hop, audio, frames in (("edge", AUDIO16, downs), ("edge.return", AUDIO8, ups)):
        f = forks[hop]
        start = json.loads(f["frames"][0])
        assert f["path"] == "/sink?cap=x"
        assert start["session"] == "sess-9" and start["audio"] == audio
        ctx = parse_traceparent(start["traceparent"])
        assert ctx.trace_id == TRACE.trace_id and ctx.span_id != TRACE.span_id
        assert f["frames"][1:-1] == frames
        assert json.loads(f["frames"][-1]) == {"type": "stop"} and f["code"] == 1000


def test_twilio_dialect_forks_media_with_the_session_from_the_handshake() -> None:
    """A real Twilio start carries no probe parameters: the session comes from the URL and the
    trace context from the traceparent header; --sink says where to fork."""
    sink = Recorder()
    inbound = [bytes([i]) * 160 for i in range(4)]
    outbound = [bytes([200 + i]) * 160 for i in range(4)]

    def media(payload: bytes, track: str | None = "inbound") -> str:
        m: dict[str, Any] = {"payload": base64.b64encode(payload).decode()}
        if track:
            m["track"] = track
        return json.dumps({"event": "media", "streamSid": "MZ1", "media": m})

    async def bot(ws: ServerConnection) -> None:
        i = 0
        async for message in ws:
            if json.loads(message)["event"] == "media":
                await ws.send(media(outbound[i], None))
                i += 1

    async def go() -> None:
        async with serve(bot, "127.0.0.1", 0) as up, serve(sink.handler, "127.0.0.1", 0) as s:
            tee = Tee(f"ws://127.0.0.1:{up.sockets[0].getsockname()[1]}/", hop="bot",
                      dialect="twilio", sink=f"ws://127.0.0.1:{s.sockets[0].getsockname()[1]}/")
            url = await tee.start()
            try:
                async with connect(url + "media?session=call-7",
                                   additional_headers={"traceparent": str(TRACE)}) as ws:
                    await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
                    await ws.send(json.dumps({
                        "event": "start", "streamSid": "MZ1",
                        "start": {"streamSid": "MZ1", "callSid": "CA1",
                                  "mediaFormat": {"encoding": "audio/x-mulaw",
                                                  "sampleRate": 8000, "channels": 1}}}))
                    for i, p in enumerate(inbound):
                        await ws.send(media(p))
                        if i == 1:
                            await ws.send(media(b"\x55" * 160, "outbound"))  # not this track
                    for _ in outbound:
                        await ws.recv()
                await wait_for(lambda: len(sink.forks) == 2 and all("code" in f
                                                                   for f in sink.forks))
            finally:
                await tee.stop()

    run(go())
    forks = sink.by_hop()
    mulaw = {"encoding": "mulaw", "sample_rate": 8000, "channels": 1}
    for hop, frames in (("bot", inbound), ("bot.return", outbound)):
        start = json.loads(forks[hop]["frames"][0])
        assert start["session"] == "call-7" and start["audio"] == mulaw
        assert parse_traceparent(start["traceparent"]).trace_id == TRACE.trace_id
        assert forks[hop]["frames"][1:-1] == frames


def test_twilio_through_the_tee_against_the_reference_pipeline_and_the_real_sink() -> None:
    """probe run --dialect twilio -> tee -> reference pipeline (Twilio dialect): the tee's two
    hops are measured beside the pipeline's, in order along the path."""

    async def go() -> dict[str, Any]:
        pipeline = ReferencePipeline("bot:60ms", dialect="twilio")
        purl = await pipeline.start()
        tee = Tee(purl, hop="tee", dialect="twilio")
        turl = await tee.start()
        try:
            cfg = RunConfig(
                source=SourceConfig(target=turl, dialect="twilio", duration_s=3.0),
                sessions=2, concurrency=2, marker_timeout_s=3.0,
                hop_order=["tee", "bot", "tee.return", "return"],
            )
            return cast(dict[str, Any], await run_probe(cfg))
        finally:
            await tee.stop()
            await pipeline.stop()

    report = run(go())
    hops = {h["name"]: h for h in report["hops"]}
    assert list(hops) == ["tee", "bot", "tee.return", "return"]
    for h in hops.values():
        assert h["markers"]["detected"] == h["markers"]["sent"] >= 6, hops
        assert not h["errors"], hops
    p50 = {name: h["latency_ms"]["p50"] for name, h in hops.items()}
    assert p50["tee"] < 10.0, p50
    assert p50["tee"] < p50["bot"] < p50["tee.return"] + 5.0, p50
    assert abs(p50["tee.return"] - p50["return"]) < 10.0, p50


# --- the whole chain, as a user runs it ----------------------------------------------------------


def test_probe_run_through_probe_tee_in_front_of_probe_pipeline(tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "tee_reference_pipeline.toml")
    hop_order = ",".join(scenario.options["hop_order"])
    pipe_port, tee_port = free_port(), free_port()
    env = {**os.environ, "PROBE_LOG_LEVEL": "INFO"}
    probe = [sys.executable, "-m", "probe.cli"]
    procs = [
        subprocess.Popen([*probe, "pipeline", "--listen", f"127.0.0.1:{pipe_port}"],
                         stderr=subprocess.PIPE, env=env),
        subprocess.Popen([*probe, "tee", "--listen", f"127.0.0.1:{tee_port}",
                          "--upstream", f"ws://127.0.0.1:{pipe_port}/", "--hop", "tee"],
                         stderr=subprocess.PIPE, text=True, env=env),
    ]
    try:
        wait_port(pipe_port)
        wait_port(tee_port)
        out = subprocess.run(
            [*probe, "run", "--target", f"ws://127.0.0.1:{tee_port}/", "--sessions", "2",
             "--concurrency", "2", "--duration", "4", "--marker-timeout", "3",
             "--hop-order", hop_order, "--json", str(tmp_path / "report.json")],
            capture_output=True, text=True, timeout=120 * SLOW,
        )
        assert out.returncode == 0, out.stderr
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15 * SLOW)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    tee_err = procs[1].stderr.read() if procs[1].stderr else ""
    assert procs[1].returncode == 0, tee_err
    assert f"probe tee: ws://127.0.0.1:{tee_port}/ -> ws://127.0.0.1:{pipe_port}/" in tee_err
    assert "2 connections" in tee_err
    forked = re.search(r"4 forks \((\d+) frames sent, (\d+) dropped\)", tee_err)
    assert forked is not None, tee_err
    assert int(forked[1]) >= 2 * 2 * 150 * 0.9  # 2 sessions x 2 ways x 4 s of 20 ms frames
    assert "Traceback" not in tee_err
    report = json.loads((tmp_path / "report.json").read_text())
    hops = {h["name"]: h for h in report["hops"]}
    assert list(hops) == list(scenario.options["hop_order"])
    for name in ("tee", "tee.return"):
        assert hops[name]["markers"]["detected"] == hops[name]["markers"]["sent"] >= 8
        assert not hops[name]["errors"]
    assert hops["tee"]["latency_ms"]["p50"] < 10.0
    assert hops["tee.return"]["latency_ms"]["p50"] > hops["model"]["latency_ms"]["p50"]
    assert hops["tee.return"]["own_latency_ms"]["p50"] < 10.0
    assert "report written" in out.stdout
