"""Trace observer and OTel setup without a network: spans in memory, the registry by hand."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from probe.errors import ConfigError
from probe.measure.conversation import Figure, ResultTiming
from probe.measure.observe import Observers
from probe.measure.registry import SessionRegistry
from probe.protocol import TraceContext
from probe.telemetry.env import tracing_enabled
from probe.telemetry.otel import start_tracing
from probe.telemetry.setup import start_telemetry
from probe.telemetry.traces import RESULT_SPAN, RESULT_TEXT_CHARS, SESSION_SPAN, TraceObserver

HOP_CTX = TraceContext("ab" * 16, "cd" * 8, 1)


def _provider(**kw: object) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**kw)  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_session_trace_markers_misses_and_links() -> None:
    provider, exporter = _provider()
    now = [1000.0]
    tracer = TraceObserver(provider, clock=lambda: now[0])
    reg = SessionRegistry(
        clock=lambda: now[0], marker_timeout=2.0, observer=Observers([tracer], hop_order=["a", "b"])
    )
    reg.open_session("s1")
    sent = reg.observer.session_started("s1", "ws://t/{session}", 1000.0)  # type: ignore[union-attr]
    assert sent is not None and sent.sampled
    reg.hop_connected("a", "s1", TraceContext(sent.trace_id, HOP_CTX.span_id, 1))
    reg.hop_connected("b", "s1")
    reg.record_send("s1", 0, 1000.5)
    reg.record_send("s1", 1, 1001.0)
    reg.record_detection("a", reg.payload_for("s1", 0), 1000.520, score=11.25)
    reg.record_detection("b", reg.payload_for("s1", 0), 1000.575, score=9.5)
    now[0] = 1001.5
    reg.close_session("s1")
    # Both arrive after the session span ended: they must still parent on it.
    reg.record_detection("a", reg.payload_for("s1", 1), 1001.021, score=8.0)
    now[0] = 1004.0
    reg.expire()
    spans = exporter.get_finished_spans()
    (root,) = _by_name(spans, SESSION_SPAN)
    assert f"{root.context.trace_id:032x}" == sent.trace_id
    assert f"{root.context.span_id:016x}" == sent.span_id
    assert root.parent is None
    assert root.start_time == 1000 * 10**9 and root.end_time == 1001_500_000_000
    assert root.attributes is not None and root.attributes["probe.outcome"] == "completed"
    markers = [s for s in spans if s.name.startswith("marker ")]
    assert sorted((s.attributes["probe.hop"], s.attributes["probe.marker"],  # type: ignore[index]
                   s.attributes["probe.outcome"]) for s in markers) == [  # type: ignore[index]
        ("a", 0, "detected"), ("a", 1, "detected"), ("b", 0, "detected"), ("b", 1, "missed")]
    for s in markers:
        assert s.parent is not None and s.parent.span_id == root.context.span_id
        assert s.context.trace_id == root.context.trace_id
    a0 = next(s for s in markers if s.name == "marker a" and s.attributes["probe.marker"] == 0)  # type: ignore[index]
    assert a0.start_time == 1000_500_000_000 and a0.end_time == 1000_520_000_000
    assert a0.attributes == {
        "probe.hop": "a", "probe.session": "s1", "probe.marker": 0, "probe.outcome": "detected",
        "probe.latency_ms": 20.0, "probe.detection_score": 11.25, "probe.own_latency_ms": 20.0,
    }
    assert [link.context.span_id for link in a0.links] == [int(HOP_CTX.span_id, 16)]
    b0 = next(s for s in markers if s.name == "marker b" and s.attributes["probe.marker"] == 0)  # type: ignore[index]
    assert b0.attributes["probe.own_latency_ms"] == 55.0  # type: ignore[index]
    assert b0.links == ()  # hop b sent no trace context
    b1 = next(s for s in markers if s.attributes["probe.outcome"] == "missed")  # type: ignore[index]
    assert b1.status.status_code is StatusCode.ERROR
    assert b1.start_time == 1001 * 10**9 and b1.end_time == 1004 * 10**9


def test_failed_session_and_hop_failure_are_errors() -> None:
    provider, exporter = _provider()
    tracer = TraceObserver(provider, clock=lambda: 50.0)
    tracer.session_started("s", "ws://t", 10.0)
    tracer.hop_failed("x", "s", "fork broke the protocol")
    tracer.session_ended("s", 12.0, "cannot connect")
    tracer.session_ended("s", 13.0, None)  # a second end changes nothing
    tracer.reply("s", 11.0, None)
    tracer.reply("s", 11.0, 0.4)
    spans = exporter.get_finished_spans()
    (root,) = _by_name(spans, SESSION_SPAN)
    assert root.status.status_code is StatusCode.ERROR and root.end_time == 12 * 10**9
    (failed,) = _by_name(spans, "hop failed x")
    assert failed.status.status_code is StatusCode.ERROR
    replies = _by_name(spans, "reply")
    assert sorted(s.status.status_code.name for s in replies) == ["ERROR", "UNSET"]
    ok = next(s for s in replies if s.status.status_code is StatusCode.UNSET)
    assert ok.end_time - ok.start_time == 400_000_000


def test_results_and_conversation_figures_are_children_of_the_session() -> None:
    provider, exporter = _provider()
    now = [1000.0]
    tracer = TraceObserver(provider, clock=lambda: now[0])
    reg = SessionRegistry(clock=lambda: now[0], observer=Observers([tracer]))
    reg.open_session("s1")
    sent = reg.observer.session_started("s1", "ws://t/{session}", 1000.0)  # type: ignore[union-attr]
    assert sent is not None
    long_text = "word " * 100
    reg.record_result(ResultTiming("s1", "interim", 1001.25, 1001.0, 0.25, "the quick", 0))
    reg.record_result(ResultTiming("s1", "final", 1002.5, None, None, long_text, 0))
    reg.record_figure(Figure("s1", "first_interim", 1000.5, 0.75, utterance=0))
    reg.record_figure(Figure("s1", "barge_in", 1003.0, 0.2))
    now[0] = 1010.0
    reg.record_figure(Figure("s1", "final_delay", 1004.0, None, "never finalized", 1))
    reg.record_figure(Figure("s1", "clear", 1003.0, None))
    reg.close_session("s1")
    spans = exporter.get_finished_spans()
    (root,) = _by_name(spans, SESSION_SPAN)
    for s in spans:
        if s is not root:
            assert s.parent is not None and s.parent.span_id == root.context.span_id, s.name
            assert s.context.trace_id == root.context.trace_id
    placed, unplaced = sorted(_by_name(spans, RESULT_SPAN), key=lambda s: s.start_time)
    assert placed.start_time == 1001 * 10**9 and placed.end_time == 1001_250_000_000
    assert placed.attributes == {
        "probe.session": "s1", "probe.result.kind": "interim", "probe.result.text": "the quick",
        "probe.result.utterance": 0, "probe.result.latency_ms": 250.0,
    }
    # Without offsets: a point at its arrival, no latency, its text cut to 200 characters.
    assert unplaced.start_time == unplaced.end_time == 1002_500_000_000
    assert unplaced.attributes is not None
    assert "probe.result.latency_ms" not in unplaced.attributes
    assert unplaced.attributes["probe.result.text"] == long_text[:RESULT_TEXT_CHARS]
    assert unplaced.attributes["probe.result.kind"] == "final"
    (first,) = _by_name(spans, "first_interim")
    assert first.start_time == 1000_500_000_000 and first.end_time == 1001_250_000_000
    assert first.status.status_code is StatusCode.UNSET
    assert first.attributes == {"probe.session": "s1", "probe.utterance": 0,
                                "probe.latency_ms": 750.0}
    (barge,) = _by_name(spans, "barge_in")
    assert barge.end_time - barge.start_time == 200_000_000
    (final,) = _by_name(spans, "final_delay")
    assert final.status.status_code is StatusCode.ERROR
    assert final.status.description == "never finalized"
    assert final.start_time == 1004 * 10**9 and final.end_time == 1010 * 10**9
    (clear,) = _by_name(spans, "clear")
    assert clear.status.status_code is StatusCode.ERROR
    assert clear.status.description == "clear never happened"


def test_unsampled_session_makes_no_spans_but_a_valid_context() -> None:
    provider, exporter = _provider(sampler=ALWAYS_OFF)
    tracer = TraceObserver(provider)
    ctx = tracer.session_started("s", "ws://t", 10.0)
    assert ctx is not None and not ctx.sampled
    reg = SessionRegistry(clock=lambda: 10.0, observer=tracer)
    reg.open_session("s")
    reg.record_send("s", 0, 10.0)
    reg.record_detection("return", reg.payload_for("s", 0), 10.1, score=9.0)
    tracer.close()
    assert exporter.get_finished_spans() == ()
    assert tracer.trace_id("s") is None


def test_close_ends_open_sessions_and_memory_is_bounded() -> None:
    provider, exporter = _provider()
    tracer = TraceObserver(provider, clock=lambda: 99.0, max_sessions=2)
    for i in range(3):
        tracer.session_started(f"s{i}", "ws://t", float(i))
    # s0 was forgotten (ended) when s2 came; close ends the others as failed.
    tracer.close()
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    assert tracer.trace_id("s0") is None and tracer.trace_id("s2") is not None
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)


def test_tracing_enabled_by_the_standard_variables_only() -> None:
    assert not tracing_enabled({})
    assert not tracing_enabled({"OTEL_SERVICE_NAME": "x"})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert tracing_enabled({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_enabled({"OTEL_TRACES_EXPORTER": "none",
                                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert not tracing_enabled({"OTEL_SDK_DISABLED": "true",
                                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER": "sometimes"},
         "OTEL_TRACES_SAMPLER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER": "traceidratio",
          "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
    ],
)
def test_bad_otel_settings_are_one_sentence(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        start_tracing("probe", environ=env)


def test_service_name_from_env_wins_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "canary-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    env = {"OTEL_TRACES_EXPORTER": "console"}
    mine = start_tracing("probe", environ=env)
    forced = start_tracing("probe-pipeline", environ=env, force_service=True)
    assert mine is not None and forced is not None
    attrs = mine.provider.resource.attributes
    assert attrs["service.name"] == "canary-eu"
    assert attrs["deployment.environment"] == "staging"
    assert forced.provider.resource.attributes["service.name"] == "probe-pipeline"
    assert mine.close(1.0) is None and forced.close(1.0) is None


def test_tracing_off_imports_no_sdk_and_adds_no_trace_observer() -> None:
    code = (
        "import sys\n"
        "from prometheus_client import CollectorRegistry\n"
        "from probe.telemetry.setup import start_telemetry\n"
        "t = start_telemetry(service='probe', target='ws://t', scenario='s', metrics_listen=None,"
        " hop_order=None, registry=CollectorRegistry(), environ={})\n"
        "print([type(o).__name__ for o in t.observer.observers], t.tracing,"
        " any(m.startswith('opentelemetry.sdk') for m in sys.modules))\n"
        "t.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['MetricsObserver'] None False"
    assert out.stderr == ""


def test_start_telemetry_with_tracing_has_both_observers() -> None:
    from prometheus_client import CollectorRegistry

    t = start_telemetry(service="probe", target="ws://t", scenario="s", metrics_listen=None,
                        hop_order=["a"], registry=CollectorRegistry(),
                        environ={"OTEL_TRACES_EXPORTER": "console"})
    try:
        assert [type(o).__name__ for o in t.observer.observers] == [
            "TraceObserver", "MetricsObserver"]
        assert t.tracer_provider is not None
    finally:
        t.close()
