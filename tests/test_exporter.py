"""`probe exporter` over real HTTP on loopback: /probe against a reference pipeline and a down
target, the bound on probes at once, bad queries, /metrics, and the command itself."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from conftest import BackgroundPipeline, free_port
from prometheus_client.parser import text_string_to_metric_families

from probe.aio.runner import run_config
from probe.canary.exporter import ProbeExporter, serve_exporter
from probe.canary.scenario import load_scenario_dir
from probe.config import run_defaults

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
QUICK = """
description = "a short probe for the tests"
sessions = 1
duration = 2.0
marker_timeout = 2.0
hop_order = ["a", "b", "return"]
thresholds = ["hop=b p95<250ms", "markers>=50%"]
"""


def _get(url: str, timeout: float = 30.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def _values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


@pytest.fixture(scope="module")
def pipeline() -> Iterator[BackgroundPipeline]:
    p = BackgroundPipeline("a:20ms,b:40ms")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture()
def exporter(tmp_path: Path) -> Iterator[tuple[str, ProbeExporter]]:
    (tmp_path / "quick.toml").write_text(QUICK)
    defaults = {**run_defaults(), "duration": 1.0, "marker_timeout": 1.0}
    exp = ProbeExporter(load_scenario_dir(tmp_path), run_config, defaults=defaults,
                        max_probes=1, queue_timeout_s=0.3)
    server = serve_exporter(exp, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", exp
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_probe_success_and_bounded_concurrency(
    pipeline: BackgroundPipeline, exporter: tuple[str, ProbeExporter]
) -> None:
    base, _ = exporter
    answers: list[tuple[int, str]] = []
    query = urlencode({"target": pipeline.url, "scenario": "quick"})
    first = threading.Thread(target=lambda: answers.append(_get(f"{base}/probe?{query}")))
    first.start()
    deadline = time.monotonic() + 5
    while True:  # until the first probe holds the only slot
        _, text = _get(f"{base}/metrics")
        if _values(text)["probe_exporter_probes_in_flight"][0][1] == 1:
            break
        assert time.monotonic() < deadline, "the first probe never started"
        time.sleep(0.05)
    t0 = time.monotonic()
    status, body = _get(f"{base}/probe?{query}")
    waited = time.monotonic() - t0
    assert status == 503, body
    assert body.count("\n") == 1 and "1 probes are already running" in body
    assert 0.25 <= waited < 2.0
    first.join(30)
    ((status, text),) = answers
    assert status == 200, text
    v = _values(text)
    assert v["probe_success"] == [({}, 1.0)]
    assert v["probe_duration_seconds"][0][1] > 2.0
    lat = {(lb["hop"], lb["quantile"]): x for lb, x in v["probe_hop_latency_seconds"]}
    assert abs(lat[("b", "0.5")] - 0.060) < 0.01
    assert ({"threshold": "hop=b p95<250ms"}, 1.0) in v["probe_threshold_ok"]
    _, own = _get(f"{base}/metrics")
    counts = {lb["result"]: x for lb, x in _values(own)["probe_exporter_probes_total"]}
    assert counts["success"] == 1 and counts["rejected"] == 1 and counts["failure"] == 0
    # The slot is free again.
    status, _ = _get(f"{base}/probe?{urlencode({'target': f'ws://127.0.0.1:{free_port()}/'})}")
    assert status == 200


def test_down_target_is_probe_success_0_with_http_200(exporter: tuple[str, ProbeExporter]) -> None:
    base, _ = exporter
    target = f"ws://127.0.0.1:{free_port()}/x/{{session}}"
    status, text = _get(f"{base}/probe?{urlencode({'target': target})}")
    assert status == 200
    v = _values(text)
    assert v["probe_success"] == [({}, 0.0)]
    assert v["probe_sessions_completed"] == [({}, 0.0)]
    assert ({"threshold": "sessions>=100%"}, 0.0) in v["probe_threshold_ok"]


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("", "Give a target"),
        ("scenario=quick", "Give a target"),
        ("target=http://x/", "ws:// or wss://"),
        ("target=ws://x/&scenario=nope", "Unknown scenario 'nope' (known: quick)"),
        ("target=ws://x/&module=http_2xx", "Unknown query parameter 'module'"),
        ("target=ws://x/&target=ws://y/", "'target' is given 2 times"),
        ("target", "not a valid query string"),
    ],
)
def test_bad_queries_are_400_with_one_sentence(
    exporter: tuple[str, ProbeExporter], query: str, needle: str
) -> None:
    base, _ = exporter
    status, body = _get(f"{base}/probe?{query}")
    assert status == 400
    assert needle in body and body.count("\n") == 1, body
    _, own = _get(f"{base}/metrics")
    counts = {lb["result"]: x for lb, x in _values(own)["probe_exporter_probes_total"]}
    assert counts["bad_request"] == 1


def test_other_paths_and_methods(exporter: tuple[str, ProbeExporter]) -> None:
    base, _ = exporter
    assert _get(f"{base}/nope")[0] == 404
    status, body = _get(f"{base}/")
    assert status == 200 and "quick" in body
    req = urllib.request.Request(f"{base}/probe?target=ws://x/", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405


def test_exporter_command_serves_until_stopped() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "exporter", "--listen", "127.0.0.1:0",
         "--scenarios", str(SCENARIOS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("probe exporter on http://127.0.0.1:"), line
        base = line.split()[3].removesuffix("/probe")
        status, text = _get(f"{base}/metrics", timeout=10)
        assert status == 200 and "probe_exporter_probes_in_flight 0.0" in text
        status, body = _get(f"{base}/probe?scenario=nope", timeout=10)
        assert status == 400 and "session_in_path" in body
    finally:
        proc.terminate()
        proc.wait(10)


def test_prometheus_scrape_timeout_bounds_the_probe(
    pipeline: BackgroundPipeline, exporter: tuple[str, ProbeExporter]
) -> None:
    """The scrape timeout header cuts the marker timeout so the answer beats it; a scenario that
    cannot fit at all is a 400 naming both figures."""
    base, _ = exporter
    query = urlencode({"target": pipeline.url, "scenario": "quick"})
    # quick: 1 session of 2 s + 2 s of start-up and settling; 5 s less the 0.5 s offset leaves
    # 0.5 s each for draining (3 s asked) and the marker timeout (2 s asked).
    req = urllib.request.Request(
        f"{base}/probe?{query}", headers={"X-Prometheus-Scrape-Timeout-Seconds": "5.5"}
    )
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read().decode()
    assert time.monotonic() - t0 < 5.5
    assert _values(body)["probe_success"][0][1] == 1.0
    req = urllib.request.Request(
        f"{base}/probe?{query}", headers={"X-Prometheus-Scrape-Timeout-Seconds": "3"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    text = err.value.read().decode()
    assert "Prometheus allows 3 s" in text and text.count("\n") == 1
