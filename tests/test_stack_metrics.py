"""The Grafana dashboard asks only for metrics the probe really exposes, in valid PromQL.

Two real runs against the reference pipeline on loopback give the names: a probe run with its
/metrics served (what Locust workers and `probe run --metrics-listen` expose), and the stack's
canary (`probe canary --scenario deploy/scenarios/reference.toml`) pushed to Debian's real
Pushgateway (what the compose canary pushes; the exporter's /probe answers the same names).
promtool parses every query as a recording rule, with Grafana's variables filled in, and a real
Prometheus started as the compose file starts it (exemplar storage on) scrapes a live run and
answers every live panel's query with numbers, and the latency exemplars with trace ids."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BackgroundPipeline, free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/probe.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml"
SCENARIO = ROOT / "deploy/scenarios/reference.toml"
HOPS = "ingest:20ms,telephony:35ms:mulaw8k,model:120ms"
HOP_ORDER = ["ingest", "telephony", "model", "return"]
PUSHGATEWAY = "prometheus-pushgateway"
_CI = os.environ.get("CI") == "true"
_SUFFIXES = ("_bucket", "_sum", "_count")


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if _CI:
            pytest.fail(f"{binary} is not installed (CI installs it in .ci/run)")
        pytest.skip(f"{binary} not installed")
    return path


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def _dashboard_metrics() -> set[str]:
    names = set()
    for expr in _exprs(_dashboard()):
        for name in re.findall(r"\bprobe_[a-z0-9_]+", expr):
            for suffix in _SUFFIXES:
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            names.add(name)
    return names


def _exposed_names(text: str) -> set[str]:
    """Metric family names (``# TYPE``) and sample names in a text exposition."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names




def _get(url: str, accept: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(r.read().decode())


@pytest.fixture(scope="module")
def pipeline() -> Iterator[BackgroundPipeline]:
    p = BackgroundPipeline(HOPS)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def live_metrics(pipeline: BackgroundPipeline) -> dict[str, str]:
    """/metrics of a real probe run, in both expositions, read while it is still served."""
    from prometheus_client import CollectorRegistry

    from probe.aio.runner import RunConfig, run_probe
    from probe.aio.source import SourceConfig
    from probe.telemetry.setup import start_telemetry

    telemetry = start_telemetry(
        service="probe-stack-test",
        target=pipeline.url,
        scenario="stack-test",
        metrics_listen="127.0.0.1:0",
        hop_order=HOP_ORDER,
        registry=CollectorRegistry(),
        environ={},
    )
    try:
        assert telemetry.metrics_url, "start_telemetry served no /metrics"
        cfg = RunConfig(
            source=SourceConfig(target=pipeline.url, duration_s=2.5),
            sessions=2,
            concurrency=2,
            hop_order=HOP_ORDER,
            marker_timeout_s=3.0,
        )
        report = asyncio.run(run_probe(cfg, observer=telemetry.observer))
        assert report["sessions"]["completed"] == 2, report["sessions"]
        return {
            "text": _get(telemetry.metrics_url),
            "openmetrics": _get(telemetry.metrics_url, "application/openmetrics-text"),
        }
    finally:
        telemetry.close()


@pytest.fixture(scope="module")
def canary_metrics(pipeline: BackgroundPipeline) -> str:
    """The Pushgateway's /metrics after the stack's canary scenario ran against the pipeline."""
    from probe.cli import main

    exe = _need(PUSHGATEWAY)
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [exe, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                _get(f"{gateway}/-/ready")
                break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"the Pushgateway did not start: {err[-500:]}")
            time.sleep(0.1)
        argv = [
            "canary", "--scenario", str(SCENARIO), "--target", pipeline.url,
            "--sink-listen", "127.0.0.1:0", "--pushgateway", gateway, "--job", "stack_test",
        ]  # fmt: skip
        # The stack's scenario must pass against the reference pipeline (it is what the compose
        # canary runs). A second try absorbs one run starved of CPU by a busy machine.
        code = main(argv)
        if code != 0:
            code = main(argv)
        assert code == 0, "the stack's canary scenario failed against the reference pipeline"
        return _get(f"{gateway}/metrics")
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_dashboard_queries_the_metrics_the_issue_names() -> None:
    assert _dashboard_metrics() >= {
        "probe_hop_latency_seconds",
        "probe_hop_own_latency_seconds",
        "probe_markers_total",
        "probe_send_lag_seconds",
        "probe_sessions_total",
        "probe_active_sessions",
        "probe_success",
        "probe_last_success_timestamp_seconds",
    }


def test_every_dashboard_metric_exists_in_a_real_run_or_canary_push(
    live_metrics: dict[str, str], canary_metrics: str
) -> None:
    live = _exposed_names(live_metrics["text"])
    pushed = _exposed_names(canary_metrics)
    missing = sorted(_dashboard_metrics() - live - pushed)
    assert not missing, f"the dashboard queries metrics nobody exposes: {missing}"
    # Each source really contributed (the test would pass vacuously on an empty set otherwise).
    assert "probe_hop_latency_seconds" in live and "probe_markers_total" in live
    assert {"probe_success", "probe_last_success_timestamp_seconds"} <= pushed


def test_the_name_check_catches_a_metric_nobody_exposes(live_metrics: dict[str, str]) -> None:
    live = _exposed_names(live_metrics["text"])
    assert "probe_hop_latency_typo_seconds" not in live
    assert "probe_hop_latency_seconds_bucket" in live


def test_live_latency_buckets_carry_trace_id_exemplars(live_metrics: dict[str, str]) -> None:
    """What the dashboard's exemplar links need: `trace_id` on the latency histograms."""
    lines = [
        ln
        for ln in live_metrics["openmetrics"].splitlines()
        if ln.startswith("probe_hop_latency_seconds_bucket") and " # {" in ln
    ]
    assert lines, "no exemplars on probe_hop_latency_seconds in the OpenMetrics exposition"
    assert all(re.search(r'# \{trace_id="[0-9a-f]{32}"\}', ln) for ln in lines), lines[:3]
    sources = {d["uid"]: d for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    prom = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert [d["name"] for d in prom] == ["trace_id"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exe = _need("promtool")
    fill = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$hop": ".*",
        "$scenario": ".*",
        "$target": ".*",
    }
    rules = []
    for i, expr in enumerate(_exprs(_dashboard())):
        if expr.startswith("label_values("):
            # A Grafana variable query: label_values(SELECTOR, LABEL); check the selector.
            expr = expr[len("label_values(") : expr.rindex(",")]
        for key, value in fill.items():
            expr = expr.replace(key, value)
        assert "$" not in expr, f"an unfilled Grafana variable in {expr!r}"
        rules.append({"record": f"probe:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_dashboard_structure_grafana_loads() -> None:
    dash = _dashboard()
    sources = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"hop", "scenario", "target"}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] in sources, p["title"]
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__interval"}
            assert used <= variables, (p["title"], used)
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] in sources
    by_type: dict[str, list[dict[str, Any]]] = {}
    for p in panels:
        by_type.setdefault(p["type"], []).append(p)
    (heatmap,) = by_type["heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "probe_hop_latency_seconds_bucket" in heatmap["targets"][0]["expr"]
    assert heatmap["repeat"] == "hop"
    exemplar_panels = [
        p["title"] for p in panels if any(t.get("exemplar") for t in p.get("targets", []))
    ]
    assert any("Cumulative latency" in t for t in exemplar_panels), exemplar_panels
    assert any("Own latency" in t for t in exemplar_panels), exemplar_panels
    titles = " | ".join(p["title"] for p in panels)
    for needed in ("Canary success", "Markers detected vs missed", "Send lag", "Active sessions"):
        assert needed in titles


def _prometheus_config(tmp_path: Path, metrics_port: int) -> Path:
    """The compose Prometheus configuration, pointed at a probe on loopback and sped up."""
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="500ms", scrape_timeout="500ms")
    cfg["scrape_configs"] = [
        {"job_name": "probe-run", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
    ]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _query(base: str, path: str, **params: str) -> Any:
    from urllib.parse import urlencode

    body = json.loads(_get(f"{base}{path}?{urlencode(params)}"))
    assert body["status"] == "success", body
    return body["data"]


def test_dashboard_panels_show_data_from_a_real_prometheus(
    pipeline: BackgroundPipeline, tmp_path: Path
) -> None:
    """Prometheus (as compose runs it: exemplar storage on) scrapes a live probe run; every live
    panel's query then returns finite numbers, and the latency exemplars carry trace ids."""
    import math

    from prometheus_client import CollectorRegistry

    from probe.aio.runner import RunConfig, run_probe
    from probe.aio.source import SourceConfig
    from probe.telemetry.setup import start_telemetry

    exe = _need("prometheus")
    metrics_port, prom_port = free_port(), free_port()
    base = f"http://127.0.0.1:{prom_port}"
    proc = subprocess.Popen(
        [exe, f"--config.file={_prometheus_config(tmp_path, metrics_port)}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--enable-feature=exemplar-storage"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    telemetry = start_telemetry(
        service="probe-stack-test",
        target=pipeline.url,
        scenario="stack-prometheus",
        metrics_listen=f"127.0.0.1:{metrics_port}",
        hop_order=HOP_ORDER,
        registry=CollectorRegistry(),
        environ={},
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # ready, and the probe's target already scraped once
            try:
                up = _query(base, "/api/v1/query", query='up{job="probe-run"}')["result"]
                if up and up[0]["value"][1] == "1":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"Prometheus did not start or scrape: {err[-800:]}")
            time.sleep(0.2)
        t0 = time.time()
        cfg = RunConfig(
            source=SourceConfig(target=pipeline.url, duration_s=3.0),
            sessions=2,
            concurrency=2,
            hop_order=HOP_ORDER,
            marker_timeout_s=3.0,
        )
        report = asyncio.run(run_probe(cfg, observer=telemetry.observer))
        assert report["sessions"]["completed"] == 2
        time.sleep(1.5)  # two more scrapes after the last marker
        window = f"{max(10, math.ceil(time.time() - t0) + 3)}s"
        live = [
            (p["title"], t["expr"])
            for p in _panels(_dashboard())
            for t in p.get("targets", [])
            if "expr" in t
            and not re.search(r"probe_(success|last_success|duration_seconds|reply)", t["expr"])
            and 'quantile="' not in t["expr"]
        ]
        assert len(live) >= 8, live
        empty = []
        for title, expr in live:
            for key, value in (("$__rate_interval", window), ("$hop", ".*"),
                               ("$scenario", ".*"), ("$target", ".*")):  # fmt: skip
                expr = expr.replace(key, value)
            result = _query(base, "/api/v1/query", query=expr)["result"]
            values = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr} -> {values}")
        assert not empty, "\n".join(empty)
        hops = _query(base, "/api/v1/label/hop/values")
        assert set(HOP_ORDER) <= set(hops), hops
        exemplars = _query(
            base,
            "/api/v1/query_exemplars",
            query="probe_hop_latency_seconds_bucket",
            start=str(t0 - 5),
            end=str(time.time() + 1),
        )
        trace_ids = {e["labels"].get("trace_id") for s in exemplars for e in s["exemplars"]}
        assert trace_ids and all(re.fullmatch(r"[0-9a-f]{32}", t or "") for t in trace_ids)
    finally:
        telemetry.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
