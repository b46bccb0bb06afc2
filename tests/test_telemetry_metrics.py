"""Prometheus metrics: the observer driven by hand, the /metrics server, and a real Prometheus
(Debian's binary, started here on loopback) scraping a run and answering PromQL by hop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig
from probe.cli import main
from probe.errors import ConfigError
from probe.measure.conversation import Figure, ResultTiming
from probe.measure.observe import Observers
from probe.measure.registry import SessionRegistry
from probe.pipeline import ReferencePipeline
from probe.protocol import TraceContext
from probe.telemetry.metrics import LATENCY_BUCKETS, OTHER, MetricsObserver
from probe.telemetry.setup import start_telemetry

TRACE = "0af7651916cd43dd8448eb211c80319c"


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    assert v is not None, (name, labels)
    return v


def test_observer_counts_latencies_markers_sessions_with_exemplars() -> None:
    reg = CollectorRegistry()
    now = [10.0]
    metrics = MetricsObserver(reg, "ws://sut/{session}", "smoke", hop_order=["a", "b"])
    obs = Observers([metrics], hop_order=["a", "b"])
    sessions = SessionRegistry(clock=lambda: now[0], marker_timeout=2.0, observer=obs)
    lbl = {"target": "ws://sut/{session}", "scenario": "smoke"}
    # Declared hops have their series from the start, at zero.
    assert _value(reg, "probe_hop_latency_seconds_count", hop="b", **lbl) == 0
    assert _value(reg, "probe_markers_total", hop="a", outcome="missed") == 0
    sessions.open_session("s1")
    obs.session_started("s1", "ws://sut/s1", 10.0)
    assert _value(reg, "probe_active_sessions") == 1
    sessions.hop_connected("a", "s1", TraceContext(TRACE, "1" * 16, 1))
    sessions.hop_connected("b", "s1")
    sessions.record_send("s1", 0, 10.0)
    sessions.record_send("s1", 1, 10.5)
    sessions.record_send_lag("s1", 0.0015)
    sessions.record_detection("a", sessions.payload_for("s1", 0), 10.020, score=9.0)
    # b before a, jittered: own latency would be negative; observed as 0.
    sessions.record_detection("b", sessions.payload_for("s1", 0), 10.018, score=9.0)
    sessions.record_detection("a", sessions.payload_for("s1", 1), 10.540, score=9.0)
    now[0] = 13.0
    sessions.expire()
    sessions.close_session("s1")
    obs.reply("s1", 11.0, 0.8)
    obs.reply("s1", 12.0, None)
    assert _value(reg, "probe_hop_latency_seconds_count", hop="a", **lbl) == 2
    assert abs(_value(reg, "probe_hop_latency_seconds_sum", hop="a", **lbl) - 0.060) < 1e-9
    assert _value(reg, "probe_hop_latency_seconds_bucket", hop="a", le="0.02", **lbl) == 1
    assert _value(reg, "probe_hop_latency_seconds_bucket", hop="a", le="0.03", **lbl) == 1
    assert _value(reg, "probe_hop_latency_seconds_bucket", hop="a", le="0.04", **lbl) == 2
    assert _value(reg, "probe_hop_own_latency_seconds_sum", hop="b", **lbl) == 0.0
    assert _value(reg, "probe_hop_own_latency_seconds_count", hop="b", **lbl) == 1
    assert _value(reg, "probe_markers_total", hop="a", outcome="detected") == 2
    assert _value(reg, "probe_markers_total", hop="b", outcome="detected") == 1
    assert _value(reg, "probe_markers_total", hop="b", outcome="missed") == 1
    assert _value(reg, "probe_send_lag_seconds_count") == 1
    assert _value(reg, "probe_reply_latency_seconds_count", **lbl) == 1
    assert _value(reg, "probe_sessions_total", outcome="completed") == 1
    assert _value(reg, "probe_sessions_total", outcome="failed") == 0
    assert _value(reg, "probe_active_sessions") == 0
    text = openmetrics_latest(reg).decode()
    # The fork's trace context gave the session's trace id: every latency exemplar carries it.
    exemplars = [line for line in text.splitlines()
                 if line.startswith("probe_hop_latency_seconds_bucket") and " # " in line]
    assert exemplars and all(f'trace_id="{TRACE}"' in line for line in exemplars)
    assert 'le="0.02"' in exemplars[0]
    assert abs(float(exemplars[0].split("} ")[-1].split()[0]) - 0.020) < 1e-9


def test_conversation_results_and_figures_with_exemplars() -> None:
    reg = CollectorRegistry()
    lbl = {"target": "ws://stt/{session}", "scenario": "stt"}
    metrics = MetricsObserver(reg, lbl["target"], lbl["scenario"])
    obs = Observers([metrics])
    sessions = SessionRegistry(clock=lambda: 10.0, observer=obs)
    sessions.open_session("s1")
    obs.session_started("s1", "ws://stt/s1", 10.0)
    sessions.hop_connected("return", "s1", TraceContext(TRACE, "1" * 16, 1))
    sessions.record_result(ResultTiming("s1", "interim", 11.2, 11.0, 0.2, "the quick", 0))
    sessions.record_result(ResultTiming("s1", "interim", 11.5, 11.46, 0.04, "the quick brown", 0))
    sessions.record_result(ResultTiming("s1", "final", 12.6, 12.3, 0.3, "the quick brown fox", 0))
    sessions.record_result(ResultTiming("s1", "final", 13.0, None, None, "jumps", 1))
    sessions.record_result(ResultTiming("s1", "bogus", 13.1, 13.0, 0.1, "?", 1))
    sessions.record_figure(Figure("s1", "first_interim", 10.1, 1.1, utterance=0))
    sessions.record_figure(Figure("s1", "final_delay", 12.3, 0.3, utterance=0))
    sessions.record_figure(Figure("s1", "final_delay", 13.3, None, "never finalized", 1))
    sessions.record_figure(Figure("s1", "barge_in", 14.0, 0.25))
    sessions.record_figure(Figure("s1", "clear", 14.0, None, "no clear event"))
    sessions.record_figure(Figure("s1", "clear", 15.0, 0.12))
    kind = "probe_result_latency_seconds"
    assert _value(reg, f"{kind}_count", kind="interim", **lbl) == 2
    assert abs(_value(reg, f"{kind}_sum", kind="interim", **lbl) - 0.24) < 1e-9
    assert _value(reg, f"{kind}_bucket", kind="interim", le="0.05", **lbl) == 1
    assert _value(reg, f"{kind}_count", kind="final", **lbl) == 1
    assert _value(reg, f"{kind}_count", kind=OTHER, **lbl) == 1
    assert _value(reg, "probe_results_total", kind="interim", offsets="yes", **lbl) == 2
    assert _value(reg, "probe_results_total", kind="final", offsets="yes", **lbl) == 1
    assert _value(reg, "probe_results_total", kind="final", offsets="no", **lbl) == 1
    assert _value(reg, "probe_first_interim_seconds_count", **lbl) == 1
    assert abs(_value(reg, "probe_first_interim_seconds_sum", **lbl) - 1.1) < 1e-9
    assert _value(reg, "probe_final_delay_seconds_count", **lbl) == 1
    assert _value(reg, "probe_barge_in_latency_seconds_bucket", le="0.3", **lbl) == 1
    assert _value(reg, "probe_barge_in_latency_seconds_bucket", le="0.2", **lbl) == 0
    assert _value(reg, "probe_barge_in_clear_seconds_count", **lbl) == 1
    missed = "probe_conversation_missed_total"
    assert _value(reg, missed, figure="final_delay", **lbl) == 1
    assert _value(reg, missed, figure="clear", **lbl) == 1
    assert reg.get_sample_value(missed, {"figure": "barge_in", **lbl}) is None
    text = openmetrics_latest(reg).decode()
    for name in (kind, "probe_first_interim_seconds", "probe_final_delay_seconds",
                 "probe_barge_in_latency_seconds", "probe_barge_in_clear_seconds"):
        exemplars = [line for line in text.splitlines()
                     if line.startswith(f"{name}_bucket") and " # " in line]
        assert exemplars and all(f'trace_id="{TRACE}"' in line for line in exemplars), name


def test_no_conversation_series_without_conversation() -> None:
    reg = CollectorRegistry()
    MetricsObserver(reg, "t", "s", hop_order=["a"])
    names = {s.name for m in reg.collect() for s in m.samples}
    assert not any(n.startswith(("probe_result", "probe_first_interim", "probe_final_delay",
                                 "probe_barge_in", "probe_conversation")) for n in names)


def test_hop_label_values_are_bounded() -> None:
    reg = CollectorRegistry()
    metrics = MetricsObserver(reg, "t", "s", max_hops=2)
    sessions = SessionRegistry(clock=lambda: 0.0, observer=metrics)
    sessions.open_session("s")
    for i in range(200):
        sessions.record_send("s", i, 0.0)
    for i, hop in enumerate(["h0", "h1", "h2", "h3", "return"]):
        sessions.record_detection(hop, sessions.payload_for("s", i), 0.01, score=9.0)
    hops = {s.labels["hop"] for m in reg.collect() if m.name == "probe_markers"
            for s in m.samples}
    assert hops == {"h0", "h1", OTHER, "return"}
    assert _value(reg, "probe_markers_total", hop=OTHER, outcome="detected") == 2


def test_observers_on_one_registry_share_families() -> None:
    reg = CollectorRegistry()
    one = MetricsObserver(reg, "t1", "s")
    two = MetricsObserver(reg, "t2", "s")
    one.session_started("x", "t1", 0.0)
    two.session_started("y", "t2", 0.0)
    assert _value(reg, "probe_active_sessions") == 2


def _get(url: str, accept: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def test_metrics_server_serves_openmetrics_with_exemplars() -> None:
    t = start_telemetry(service="probe", target="t", scenario="s", metrics_listen="127.0.0.1:0",
                        hop_order=["a"], registry=CollectorRegistry(), environ={})
    try:
        assert t.metrics_url is not None and t.metrics_url.endswith("/metrics")
        t.observer.session_started("s1", "t", 0.0)
        t.observer.hop_joined("a", "s1", TraceContext(TRACE, "2" * 16, 1))
        from probe.measure.registry import Measurement

        t.observer.detected(Measurement("a", "s1", 0, 0.0, 0.25, 0.25, 9.0), None)
        plain = _get(t.metrics_url)
        om = _get(t.metrics_url, "application/openmetrics-text; version=1.0.0")
        assert 'probe_hop_latency_seconds_count{hop="a",scenario="s",target="t"} 1.0' in plain
        assert "trace_id" not in plain
        assert f'# {{trace_id="{TRACE}"}} 0.25' in om and om.rstrip().endswith("# EOF")
    finally:
        t.close()
    with pytest.raises(OSError):
        _get(t.metrics_url)


def test_bad_metrics_listen_is_a_config_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for bad in ("nonsense", "127.0.0.1:99999", f"127.0.0.1:{port}"):
            with pytest.raises(ConfigError, match="--metrics-listen"):
                start_telemetry(service="p", target="t", scenario="s", metrics_listen=bad,
                                hop_order=None, registry=CollectorRegistry(), environ={})


def test_cli_bad_metrics_listen_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", "--target", "ws://127.0.0.1:9/", "--metrics-listen", "nope"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("probe: --metrics-listen must be HOST:PORT")


# -- a real Prometheus ------------------------------------------------------------------------

HOPS = "a:25ms,b:35ms:mulaw8k"
ORDER = ["a", "b", "return"]




@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (CI installs it via .ci/run)")
        pytest.skip("prometheus is not installed")
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        body = _get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, promql: str) -> list[Any]:
        data = self.api("query", query=promql)
        result: list[Any] = data["result"]
        return result

    def wait(self, what: str, ok: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"Prometheus: timed out waiting for {what}")


def _start_prometheus(binary: str, tmp: Path, metrics_url: str) -> Iterator[Prometheus]:
    scrape = urllib.parse.urlsplit(metrics_url)
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        "scrape_configs:\n  - job_name: probe\n"
        f"    metrics_path: {scrape.path}\n"
        f"    static_configs:\n      - targets: ['{scrape.netloc}']\n"
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        prom.wait("ready", lambda: "Ready" in _get(f"{prom.url}/-/ready"))
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def _bucket(seconds: float) -> tuple[float, float]:
    lower = 0.0
    for upper in LATENCY_BUCKETS:
        if seconds <= upper:
            return lower, upper
        lower = upper
    return lower, float("inf")


def test_prometheus_scrapes_a_run_p95_by_hop_and_exemplars(
    prometheus_binary: str, tmp_path: Path
) -> None:
    reg = CollectorRegistry()
    telemetry = start_telemetry(service="probe", target="ws://sut/", scenario="prom",
                                metrics_listen="127.0.0.1:0", hop_order=ORDER, registry=reg,
                                environ={})
    assert telemetry.metrics_url is not None
    try:
        gen = _start_prometheus(prometheus_binary, tmp_path, telemetry.metrics_url)
        prom = next(gen)
        try:
            count = 'probe_hop_latency_seconds_count{scenario="prom"}'
            # Every hop's series is scraped at zero before the run: rate() then sees it all.
            prom.wait("the first scrape", lambda: len(prom.query(count)) == len(ORDER))
            started = time.time()

            async def go() -> tuple[dict[str, Any], ReferencePipeline]:
                pipeline = ReferencePipeline(HOPS)
                url = await pipeline.start("127.0.0.1", 0)
                try:
                    cfg = RunConfig(
                        source=SourceConfig(target=url, duration_s=3.0, drain_s=1.0),
                        sessions=2, concurrency=2, hop_order=ORDER, marker_timeout_s=3.0,
                    )
                    return await run_probe(cfg, observer=telemetry.observer), pipeline
                finally:
                    await pipeline.stop()

            report, pipeline = asyncio.run(go())
            detected = sum(h["markers"]["detected"] for h in report["hops"])
            assert detected >= 2 * 5 * len(ORDER)

            def scraped_all() -> bool:
                r = prom.query(f'sum({count})')
                return bool(r) and float(r[0]["value"][1]) == detected

            prom.wait("the final scrape", scraped_all)
            q = ('histogram_quantile(0.95, sum by (le, hop) '
                 '(rate(probe_hop_latency_seconds_bucket{scenario="prom"}[1m])))')
            by_hop = {r["metric"]["hop"]: float(r["value"][1]) for r in prom.query(q)}
            print("PromQL p95 by hop:", by_hop, "report p95 ms:",
                  {h["name"]: h["latency_ms"]["p95"] for h in report["hops"]})
            assert sorted(by_hop) == sorted(ORDER)
            for hop in report["hops"]:
                p95 = hop["latency_ms"]["p95"] / 1000.0
                lower, upper = _bucket(p95)
                assert lower <= by_hop[hop["name"]] <= upper, (hop["name"], p95, by_hop)

            sent = {r.trace_id for r in pipeline.spans}
            data = prom.api("query_exemplars", query="probe_hop_latency_seconds_bucket",
                            start=str(started - 5), end=str(time.time() + 5))
            exemplars = [(s["seriesLabels"], e) for s in data for e in s["exemplars"]]
            print("exemplars:", len(exemplars), "of traces", len(sent))
            assert exemplars
            for labels, e in exemplars:
                assert e["labels"]["trace_id"] in sent
                lower, upper = _bucket(float(e["value"]))
                assert float(labels["le"]) == upper
        finally:
            gen.close()
    finally:
        telemetry.close()
