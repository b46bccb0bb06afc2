"""Prometheus schedules the canary itself: Debian's real Prometheus scrapes the exporter's /probe
(blackbox-style relabelling) for a reference pipeline, and probe_success reads back through its
query API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from conftest import BackgroundPipeline, free_port

from probe.aio.runner import run_config
from probe.canary.exporter import ProbeExporter, serve_exporter
from probe.canary.scenario import parse_scenario
from probe.config import run_defaults

PROMETHEUS = "/usr/bin/prometheus"


@pytest.fixture()
def exporter() -> Iterator[str]:
    quick = parse_scenario(
        {"duration": 1.0, "marker_timeout": 1.0, "hop_order": ["a", "b", "return"],
         "thresholds": ["hop=b p95<250ms"]},
        name="quick",
    )
    exp = ProbeExporter({"quick": quick}, run_config, defaults=run_defaults(), max_probes=2)
    server = serve_exporter(exp, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{base}/api/v1/query?{urlencode({'query': promql})}",
                                timeout=5) as r:
        data = json.loads(r.read())
    assert data["status"] == "success"
    return list(data["data"]["result"])


def test_prometheus_scrapes_probe_success(exporter: str, tmp_path: Path) -> None:
    if shutil.which(PROMETHEUS) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PROMETHEUS} is missing (CI installs prometheus)")
        pytest.skip("prometheus is not installed")
    pipeline = BackgroundPipeline("a:20ms,b:40ms")
    down = f"ws://127.0.0.1:{free_port()}/"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""
global: {{scrape_interval: 5s, scrape_timeout: 5s}}
scrape_configs:
  - job_name: probe
    metrics_path: /probe
    params: {{scenario: [quick]}}
    static_configs: [{{targets: ["{pipeline.url}", "{down}"]}}]
    relabel_configs:
      - {{source_labels: [__address__], target_label: __param_target}}
      - {{source_labels: [__param_target], target_label: instance}}
      - {{target_label: __address__, replacement: "{exporter}"}}
"""
    )
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 40
        found: dict[str, float] = {}
        while len(found) < 2:
            assert proc.poll() is None, (proc.stderr.read().decode() if proc.stderr else "")[-800:]
            assert time.monotonic() < deadline, f"Prometheus did not scrape both probes: {found}"
            time.sleep(0.5)
            try:
                rows = _query(base, 'probe_success{job="probe"}')
            except OSError:
                continue
            found = {r["metric"]["instance"]: float(r["value"][1]) for r in rows}
        assert found == {pipeline.url: 1.0, down: 0.0}
        lat = _query(base, f'probe_hop_latency_seconds{{instance="{pipeline.url}",hop="b",'
                           'quantile="0.5"}')
        assert len(lat) == 1 and abs(float(lat[0]["value"][1]) - 0.060) < 0.01
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        pipeline.close()
