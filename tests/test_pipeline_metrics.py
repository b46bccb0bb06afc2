"""`probe pipeline --metrics-listen`: the ground truth and the hops' punctuality on /metrics."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig


def test_pipeline_serves_configured_delays_and_emission_lateness() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "pipeline", "--listen", f"127.0.0.1:{port}",
         "--hops", "a:20ms,b:35ms", "--metrics-listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert m, line
        metrics_url = m.group(0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        src = SourceConfig(target=f"ws://127.0.0.1:{port}/", duration_s=2.0, drain_s=1.0)
        asyncio.run(run_probe(RunConfig(source=src, marker_timeout_s=2.0)))
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    finally:
        proc.terminate()
        proc.wait(10)
    samples = {
        (s.name, s.labels.get("hop")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("probe_pipeline_configured_delay_seconds", "a")] == 0.02
    assert abs(samples[("probe_pipeline_configured_delay_seconds", "b")] - 0.055) < 1e-9
    assert samples[("probe_pipeline_chunks_total", "b")] > 50
    assert samples[("probe_pipeline_emit_lateness_seconds_count", "a")] > 50
    assert samples[("probe_pipeline_sessions_total", None)] == 1


def test_a_taken_metrics_port_is_one_sentence_and_exit_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "probe.cli", "pipeline", "--listen",
             f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{taken}"],
            capture_output=True, text=True, timeout=30,
        )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("probe: --metrics-listen cannot listen")
    assert "Traceback" not in r.stderr
