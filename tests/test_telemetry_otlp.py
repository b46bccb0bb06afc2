"""Spans over real OTLP: a gRPC receiver and an HTTP receiver started here on loopback get both
the probe's spans and the reference pipeline's, in one trace per session."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client import CollectorRegistry

from probe.aio.runner import RunConfig, run_probe
from probe.aio.source import SourceConfig
from probe.cli import main
from probe.pipeline import ReferencePipeline
from probe.telemetry.setup import start_pipeline_tracing, start_telemetry
from probe.telemetry.traces import SESSION_SPAN

HOPS = "a:25ms,b:40ms:mulaw8k"
ORDER = ["a", "b", "return"]


class Span:
    """One received span, flattened."""

    def __init__(self, service: str, raw: Any) -> None:
        self.service = service
        self.name: str = raw.name
        self.trace_id = raw.trace_id.hex()
        self.span_id = raw.span_id.hex()
        self.parent = raw.parent_span_id.hex()
        self.links = [(link.trace_id.hex(), link.span_id.hex()) for link in raw.links]
        self.start_ns: int = raw.start_time_unix_nano
        self.end_ns: int = raw.end_time_unix_nano
        self.error = raw.status.code == 2
        self.attrs: dict[str, Any] = {}
        for kv in raw.attributes:
            v = kv.value
            self.attrs[kv.key] = getattr(v, v.WhichOneof("value"))


def _spans(requests: list[trace_service_pb2.ExportTraceServiceRequest]) -> list[Span]:
    out = []
    for req in requests:
        for rs in req.resource_spans:
            service = next(
                kv.value.string_value for kv in rs.resource.attributes if kv.key == "service.name"
            )
            for ss in rs.scope_spans:
                out.extend(Span(service, s) for s in ss.spans)
    return out


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the gRPC method name)
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, _Receiver]]:
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        server.stop(grace=None)


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[Any], list[str]]]:
    requests: list[Any] = []
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(body)
            requests.append(req)
            paths.append(self.path)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests, paths
    finally:
        server.shutdown()
        server.server_close()


def _clear_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)


def _check_trace(
    spans: list[Span], report: dict[str, Any], pipeline: str = "probe-pipeline"
) -> None:
    """One trace per session: the probe's root, the pipeline's hop chain under it, and one marker
    span per marker and hop under the root, linked to that hop's span."""
    roots = [s for s in spans if s.name == SESSION_SPAN]
    assert len(roots) == report["sessions"]["started"] >= 1
    for root in roots:
        assert root.service == "probe" and root.parent == "" and not root.error
        mine = [s for s in spans if s.trace_id == root.trace_id]
        hops = {s.attrs["probe.hop"]: s for s in mine if s.service == pipeline}
        assert sorted(hops) == ["a", "b"]
        assert hops["a"].parent == root.span_id
        assert hops["b"].parent == hops["a"].span_id
        assert hops["a"].start_ns >= root.start_ns
        all_markers = [s for s in mine if s.name.startswith("marker ")]
        session = root.attrs["probe.session"]
        # One span per hop per marker: detected ones plain, missed ones with ERROR status (the
        # detector does not find every marker, so a run may have a few of those).
        seen = [(s.attrs["probe.hop"], s.attrs["probe.marker"]) for s in all_markers]
        assert len(seen) == len(set(seen))
        by_outcome = {
            outcome: {(r["hop"], r["marker"]) for r in report["series"]
                      if r["session"] == session and r["outcome"] == outcome}
            for outcome in ("detected", "missed")
        }
        missed = [s for s in all_markers if s.error]
        assert {(s.attrs["probe.hop"], s.attrs["probe.marker"]) for s in missed} == by_outcome[
            "missed"
        ]
        markers = [s for s in all_markers if not s.error]
        rows = by_outcome["detected"]
        assert {(s.attrs["probe.hop"], s.attrs["probe.marker"]) for s in markers} == rows
        assert len(rows) >= 3 * len(ORDER)
        for s in markers:
            assert s.service == "probe" and s.parent == root.span_id and not s.error
            assert s.attrs["probe.session"] == session
            assert s.attrs["probe.outcome"] == "detected"
            assert s.attrs["probe.detection_score"] > 0
            assert "probe.own_latency_ms" in s.attrs
            latency_ms = (s.end_ns - s.start_ns) / 1e6
            assert abs(latency_ms - s.attrs["probe.latency_ms"]) < 0.01
            hop = s.attrs["probe.hop"]
            if hop in hops:
                assert s.links == [(root.trace_id, hops[hop].span_id)]
            else:
                assert s.links == []  # the return direction sends no trace context
    for hop in ("a", "b"):
        own = [s.attrs["probe.own_latency_ms"] for s in spans
               if s.name == f"marker {hop}" and not s.error]
        want = {"a": 25.0, "b": 40.0}[hop]
        assert abs(sorted(own)[len(own) // 2] - want) < 5.0, (hop, own)


def test_demo_exports_both_sides_over_otlp_grpc(
    grpc_receiver: tuple[str, _Receiver], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    endpoint, receiver = grpc_receiver
    _clear_otel_env(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    out = tmp_path / "r.json"
    rc = main(["demo", "--sessions", "2", "--duration", "2.2", "--hops", HOPS, "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    spans = _spans(receiver.requests)
    assert {s.service for s in spans} == {"probe", "probe-pipeline"}
    _check_trace(spans, report)


def test_run_exports_over_otlp_http_with_the_ids_the_pipeline_saw(
    http_receiver: tuple[str, list[Any], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, requests, paths = http_receiver
    _clear_otel_env(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "probe")
    pipeline_tracing = start_pipeline_tracing("probe-pipeline", force_service=True)
    assert pipeline_tracing is not None
    telemetry = start_telemetry(service="ignored", target="ws://x/{session}", scenario="t",
                                metrics_listen=None, hop_order=ORDER,
                                registry=CollectorRegistry())
    telemetry.attach(pipeline_tracing)

    async def go() -> tuple[dict[str, Any], ReferencePipeline]:
        pipeline = ReferencePipeline(HOPS, tracer_provider=pipeline_tracing.provider)
        url = await pipeline.start("127.0.0.1", 0)
        try:
            cfg = RunConfig(source=SourceConfig(target=url, duration_s=2.2, drain_s=1.0),
                            hop_order=ORDER, marker_timeout_s=3.0)
            return await run_probe(cfg, observer=telemetry.observer), pipeline
        finally:
            await pipeline.stop()

    try:
        report, pipeline = asyncio.run(go())
    finally:
        telemetry.close()
    assert set(paths) == {"/v1/traces"}
    spans = _spans(requests)
    _check_trace(spans, report)
    exported = {(s.trace_id, s.span_id, s.parent) for s in spans if s.service == "probe-pipeline"}
    recorded = {(r.trace_id, r.span_id, r.parent_span_id) for r in pipeline.spans}
    assert exported == recorded and len(recorded) == 2
    (root,) = [s for s in spans if s.name == SESSION_SPAN]
    assert {r.trace_id for r in pipeline.spans} == {root.trace_id}




@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_unreachable_collector_warns_once_and_changes_nothing(
    protocol: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               OTEL_EXPORTER_OTLP_PROTOCOL=protocol)
    out = tmp_path / "r.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "probe.cli", "demo", "--sessions", "1", "--duration", "1.5",
         "--hops", HOPS, "--json", str(out)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["sessions"]["completed"] == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("probe: warning:") and "could not be exported" in lines[0]
    assert "Traceback" not in proc.stderr
    # The run takes ~3 s; the flush gives up after its 5 s bound at most.
    assert elapsed < 20.0


def test_probe_pipeline_command_exports_its_hop_spans_and_flushes_on_interrupt(
    grpc_receiver: tuple[str, _Receiver], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import signal

    endpoint, receiver = grpc_receiver
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
               OTEL_SERVICE_NAME="sut-pipeline")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "pipeline", "--listen", f"127.0.0.1:{port}",
         "--hops", HOPS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "pipeline not up"
                time.sleep(0.1)
        _clear_otel_env(monkeypatch)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        out = tmp_path / "r.json"
        rc = main(["run", "--target", f"ws://127.0.0.1:{port}/", "--duration", "1.5",
                   "--hop-order", ",".join(ORDER), "--marker-timeout", "3", "--json", str(out)])
        assert rc == 0
        report = json.loads(out.read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    spans = _spans(receiver.requests)
    assert {s.service for s in spans} == {"probe", "sut-pipeline"}
    _check_trace(spans, report, pipeline="sut-pipeline")
