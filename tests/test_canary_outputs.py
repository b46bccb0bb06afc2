"""The canary's outputs from a hand-made report: waterfalls, the HTML page, JUnit XML and the
Prometheus registry (no network)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from probe.canary.html import render_html, waterfalls
from probe.canary.junit import junit_xml
from probe.canary.metrics import probe_registry
from probe.canary.thresholds import judge, parse_thresholds

HOPS = ("a", "b<script>", "return")


def _series() -> list[dict[str, Any]]:
    # Four markers; end-to-end (return) latencies 100, 110, 130, 400 ms: median 120, so the
    # typical is marker 1 or 2 (both 10 ms away; the earlier send wins), the worst marker 3.
    rows: list[dict[str, Any]] = []
    e2e = [100.0, 110.0, 130.0, 400.0]
    for i, total in enumerate(e2e):
        lat = {"a": 20.0 + i, "b<script>": 60.0 + i, "return": total}
        for hop in HOPS:
            missed = i == 3 and hop == "a"
            rows.append(
                {
                    "hop": hop,
                    "session": "s1" if i % 2 == 0 else "s2",
                    "marker": i,
                    "send_time": 1000.0 + 0.5 * i,
                    "latency_ms": None if missed else lat[hop],
                    "outcome": "missed" if missed else "detected",
                }
            )
    return rows


def _summary(v: float) -> dict[str, Any]:
    return {k: v for k in ("p50", "p90", "p95", "p99", "p999", "max", "mean")} | {"count": 4}


def _report() -> dict[str, Any]:
    return {
        "schema": "probe.report/v1",
        "target": "ws://h/ws/{session}",
        "started_at": "2026-01-01T00:00:00.000Z",
        "duration_s": 6.0,
        "sessions": {"started": 2, "completed": 2, "failed": 0, "open": 0, "errors": []},
        "hops": [
            {
                "name": h,
                "markers": {"sent": 4, "detected": 3 if h == "a" else 4, "missed": 0,
                            "duplicates": 0, "unmatched": 0, "late": 0},
                "latency_ms": _summary(10.0 * (i + 1)),
                "own_latency_ms": _summary(10.0),
                "errors": [],
            }
            for i, h in enumerate(HOPS)
        ],
        "send_lag_ms": _summary(1.0),
        "series": _series(),
    }


def test_waterfalls_typical_and_worst() -> None:
    pair = waterfalls(_report())
    assert pair is not None
    typical, worst = pair
    assert (typical.marker, typical.end_to_end_ms) == (1, 110.0)
    assert (worst.marker, worst.end_to_end_ms) == (3, 400.0)
    # Bars stack along cumulative time: each starts where the previous detected hop ended.
    assert [(b.hop, b.start_ms, b.end_ms) for b in typical.bars] == [
        ("a", 0.0, 21.0), ("b<script>", 21.0, 61.0), ("return", 61.0, 110.0)]
    assert [(b.hop, b.start_ms, b.end_ms) for b in worst.bars] == [
        ("a", None, None), ("b<script>", 0.0, 63.0), ("return", 63.0, 400.0)]
    r = _report()
    for row in r["series"]:
        row["latency_ms"] = None
    assert waterfalls(r) is None


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained_and_escaped() -> None:
    r = _report()
    v = judge(r, parse_thresholds(["hop=a p95<5ms", "p99<1s"]))
    page = render_html(r, v, title="probe canary: t")
    p = _Tags()
    p.feed(page)
    names = [t for t, _ in p.tags]
    assert "script" not in names and "link" not in names and "img" not in names
    for _, attrs in p.tags:
        for key in ("src", "href"):
            assert attrs.get(key) is None, attrs
    assert "<b<script>" not in page and "b&lt;script&gt;" in page
    assert names.count("svg") == 2 + len(HOPS)  # two waterfalls, one time plot per hop
    assert names.count("polyline") == len(HOPS)
    assert "Typical marker: 110.0 ms" in page and "Worst marker: 400.0 ms" in page
    assert "FAIL" in page and "breached" in page
    assert "missed" in page


def test_html_without_detections_or_markers() -> None:
    r = _report()
    r["series"] = []
    page = render_html(r, None, title="t")
    assert "no waterfall" in page and "No markers were sent" in page


def test_junit() -> None:
    r = _report()
    v = judge(r, parse_thresholds(["hop=a p95<5ms", "p99<1s"]))
    root = ET.fromstring(junit_xml(r, v, suite="ref"))
    suite = root.find("testsuite")
    assert suite is not None
    assert suite.get("name") == "ref"
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["sessions>=100%", "hop=a p95<5ms", "p99<1s"]
    failure = cases[1].find("failure")
    assert failure is not None and "breaches" in (failure.get("message") or "")
    assert cases[2].find("failure") is None
    out = suite.find("system-out")
    assert out is not None and "canary: FAIL" in (out.text or "")


def test_metrics_registry() -> None:
    r = _report()
    v = judge(r, parse_thresholds(["p99<1s"]))
    text = generate_latest(
        probe_registry(r, v, duration_s=6.0, success=v.ok, last_success=1234.5)
    ).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["probe_success"].samples[0].value == 1
    assert fams["probe_duration_seconds"].samples[0].value == 6.0
    assert fams["probe_last_success_timestamp_seconds"].samples[0].value == 1234.5
    lat = {(s.labels["hop"], s.labels["quantile"]): s.value
           for s in fams["probe_hop_latency_seconds"].samples}
    assert lat[("return", "0.99")] == 0.03 and lat[("a", "0.5")] == 0.01
    assert {s.labels["threshold"] for s in fams["probe_threshold_ok"].samples} == {
        "sessions>=100%", "p99<1s"}
    # A run that could not start: only the verdict and its duration.
    bare = generate_latest(probe_registry(None, None, duration_s=0.1, success=False)).decode()
    names = {f.name for f in text_string_to_metric_families(bare)}
    assert names == {"probe_success", "probe_duration_seconds"}
