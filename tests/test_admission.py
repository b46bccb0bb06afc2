"""Sink admission: only forks that present the run's capability feed its sink; keyed tokens."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from conftest import BackgroundPipeline, free_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from probe.aio.hopstream import DetectionWorker
from probe.aio.runner import RunConfig, run_probe
from probe.aio.sink import Sink
from probe.aio.source import SourceConfig
from probe.config import run_options
from probe.errors import ConfigError
from probe.measure.admission import (
    NO_CAPABILITY,
    TOO_MANY_FORKS,
    WRONG_CAPABILITY,
    Admission,
    check_secret,
    new_capability,
    with_capability,
)
from probe.measure.registry import SessionRegistry, token_for

START = json.dumps({
    "type": "start", "hop": "phantom", "session": "s1",
    "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1},
})


def test_a_fork_is_admitted_only_with_the_capability_as_its_last_path_segment() -> None:
    cap = new_capability()
    assert len(cap) == 24 and cap != new_capability()
    a = Admission(cap)
    assert a.refuse(f"/sink/{cap}") is None
    assert a.refuse(f"/probe/sink/{cap}/?x=1") is None  # a proxy's prefix, a query: still it
    assert a.refuse("/sink") == NO_CAPABILITY
    assert a.refuse("/") == NO_CAPABILITY
    assert a.refuse(f"/sink/{cap[:-1]}") == WRONG_CAPABILITY
    assert a.refuse(f"/sink/{cap}x") == WRONG_CAPABILITY
    assert Admission(None).refuse("/anything") is None
    assert with_capability("ws://h:1/sink", cap) == f"ws://h:1/sink/{cap}"
    assert with_capability("wss://h/a/?q=1", cap) == f"wss://h/a/{cap}?q=1"


@pytest.mark.parametrize("bad", ["short", "x" * 129, "has space in it 123", "slash/inside/it/1234"])
def test_a_bad_sink_secret_is_one_sentence(bad: str) -> None:
    with pytest.raises(ConfigError, match="16 to 128 characters"):
        check_secret(bad, "--sink-secret")
    with pytest.raises(ConfigError, match="--sink-secret"):
        run_options({"target": "ws://h/", "sink_secret": bad})
    assert check_secret("a" * 16, "x") == "a" * 16


def test_a_run_key_makes_tokens_no_session_id_alone_gives_away() -> None:
    plain = SessionRegistry(clock=time.time)
    k1 = SessionRegistry(clock=time.time, key=b"k" * 16)
    k2 = SessionRegistry(clock=time.time, key=b"j" * 16)
    tokens = [r.open_session("abc") for r in (plain, k1, k2)]
    assert tokens[0] == token_for("abc")
    assert len(set(tokens)) == 3
    assert tokens[1] == token_for("abc", 0, b"k" * 16) < 2**24


class Calls:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def hop_connected(self, hop: str, session: str | None, trace: Any = None) -> None:
        self.calls.append(("connected", hop))

    def hop_error(self, hop: str, session: str | None, error: str) -> None:
        self.calls.append(("error", hop, error))

    def hop_silent(self, hop: str, session: str, since: float | None) -> None:
        pass

    def fork_rejected(self, reason: str) -> None:
        self.calls.append(("rejected", reason))

    def record_detection(self, *a: Any, **k: Any) -> None:
        self.calls.append(("detected",))


def test_the_sink_refuses_forks_without_the_capability_with_1008_and_creates_no_hop() -> None:
    reg = Calls()
    worker = DetectionWorker(time.monotonic)
    cap = new_capability()
    codes: list[tuple[int, str]] = []

    async def go() -> str:
        sink = Sink(reg, worker, clock=time.time, admission=Admission(cap))
        url = await sink.start("127.0.0.1", 0)
        base = url.rsplit("/", 1)[0]
        for wrong in (base, f"{base}/{'x' * 24}"):
            async with connect(wrong) as ws:
                try:
                    await ws.send(START)
                    await asyncio.wait_for(ws.recv(), 5.0)
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    codes.append((exc.rcvd.code, exc.rcvd.reason))
        async with connect(url) as ws:
            await ws.send(START)
            await ws.send('{"type": "stop"}')
        await asyncio.sleep(0.1)
        await sink.stop()
        return url

    url = asyncio.run(go())
    worker.close()
    assert url.endswith("/sink/" + cap)
    assert codes == [(1008, f"fork refused: {NO_CAPABILITY}"),
                     (1008, f"fork refused: {WRONG_CAPABILITY}")]
    assert reg.calls == [("rejected", NO_CAPABILITY), ("rejected", WRONG_CAPABILITY),
                         ("connected", "phantom")]


@pytest.mark.parametrize("sink_process", [True, False])
def test_a_rogue_fork_during_a_run_is_counted_refused_and_adds_no_hop(sink_process: bool) -> None:
    """The run's own hops fork through the URL the probe handed out and are measured; a fork to
    the bare sink address (a relay that guessed the port) is refused and counted by reason in the
    report, and no 'phantom' hop appears. With --sink-secret the URL ends with the secret."""
    pipe = BackgroundPipeline("a:20ms")
    secret = "static-secret-for-hops-0123"
    try:
        async def go() -> dict[str, Any]:
            src = SourceConfig(target=pipe.url, duration_s=3.0, drain_s=1.0)
            cfg = RunConfig(source=src, marker_timeout_s=3.0, hop_order=["a", "return"],
                            sink_process=sink_process, sink_secret=secret,
                            sink_port=free_port())
            run = asyncio.create_task(run_probe(cfg))
            await asyncio.sleep(1.5)
            bare = f"ws://127.0.0.1:{cfg.sink_port}/sink"
            for _ in range(3):
                try:
                    async with connect(bare) as ws:
                        await ws.send(START)
                        await ws.send(b"\x00\x00" * 320)
                        await asyncio.wait_for(ws.recv(), 5.0)
                except ConnectionClosed:
                    pass
            # The secret admits a statically configured hop.
            async with connect(f"ws://127.0.0.1:{cfg.sink_port}/sink/{secret}") as ws:
                await ws.send(START.replace("phantom", "static"))
                await ws.send('{"type": "stop"}')
            return await run
        report = asyncio.run(go())
    finally:
        pipe.close()
    assert report["rejected_forks"] == {NO_CAPABILITY: 3}
    names = [h["name"] for h in report["hops"]]
    assert "phantom" not in names and "static" in names
    a = next(h for h in report["hops"] if h["name"] == "a")
    assert a["markers"]["sent"] == a["markers"]["detected"] > 0


@pytest.mark.parametrize("sink_process", [True, False])
def test_forks_beyond_max_forks_are_refused_with_1013_and_counted(sink_process: bool) -> None:
    """A sink (in-process, or the sink child) holding --max-forks forks refuses one more with
    1013, counts it by reason and makes no hop of it; once a fork ends, a new one is admitted."""
    from probe.aio.sinkproc import SinkProcess

    reg = SessionRegistry(clock=time.time)
    worker = DetectionWorker(time.monotonic)
    cap = new_capability()

    async def refused(url: str) -> tuple[int, str] | None:
        async with connect(url) as ws:
            try:
                await ws.send(START)
                await asyncio.wait_for(ws.recv(), 5.0)
            except ConnectionClosed as exc:
                return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else None
        return None

    async def go() -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
        sink: Sink | SinkProcess
        if sink_process:
            sink = SinkProcess(reg, capability=cap, max_forks=3)
        else:
            sink = Sink(reg, worker, clock=time.time, admission=Admission(cap), max_forks=3)
        url = await sink.start("127.0.0.1", 0)
        held = [await connect(url) for _ in range(3)]
        for ws in held:
            await ws.send(START)
        await asyncio.sleep(0.3)
        fourth = await refused(url)
        await held[0].send('{"type": "stop"}')
        await held[0].close()
        await asyncio.sleep(0.3)
        async with connect(url) as ws:  # room again: admitted, not closed
            await ws.send(START)
            try:
                await asyncio.wait_for(ws.recv(), 0.5)
                again = None
            except TimeoutError:
                again = None
            except ConnectionClosed as exc:
                again = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else None
            await ws.send('{"type": "stop"}')
        for ws in held[1:]:
            await ws.send('{"type": "stop"}')
            await ws.close()
        await asyncio.sleep(0.2)
        if isinstance(sink, SinkProcess):
            await asyncio.to_thread(sink.drain)
        await sink.stop()
        return fourth, again

    fourth, again = asyncio.run(go())
    worker.close()
    assert fourth == (1013, f"fork refused: {TOO_MANY_FORKS}")
    assert again is None
    assert reg.rejected_forks() == {TOO_MANY_FORKS: 1}
    assert reg.hops() == ["phantom"] and not reg.hop_errors()
