"""The Prometheus view of one judged probe run: a fresh registry per run (sans-I/O).

Shared by the Pushgateway push (``probe canary --pushgateway``) and the exporter's ``/probe``
answer. Names follow blackbox_exporter where they overlap (``probe_success``,
``probe_duration_seconds``); per-hop latency is in seconds with a ``quantile`` label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from probe.canary.thresholds import Verdict

__all__ = ["QUANTILES", "probe_registry"]

QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.95", "p95"), ("0.99", "p99"), ("0.999", "p999"))


def generator_overloaded(report: Mapping[str, Any] | None) -> bool:
    """Whether the report says the probe itself was overloaded during the run."""
    return bool(report and (report.get("generator") or {}).get("overloaded"))


def probe_registry(
    report: Mapping[str, Any] | None,
    verdict: Verdict | None,
    *,
    duration_s: float,
    success: bool,
    last_success: float | None = None,
) -> CollectorRegistry:
    """A registry holding the run's metrics. ``report`` None (the run could not even start)
    leaves only ``probe_success`` and ``probe_duration_seconds``. ``last_success`` (epoch
    seconds) adds ``probe_last_success_timestamp_seconds``: give it only when the run passed."""
    reg = CollectorRegistry(auto_describe=True)
    Gauge("probe_success", "1 when the probe ran and every threshold held", registry=reg).set(
        1 if success else 0
    )
    Gauge("probe_duration_seconds", "Wall time of the probe run", registry=reg).set(duration_s)
    if last_success is not None:
        Gauge(
            "probe_last_success_timestamp_seconds",
            "When the probe last passed (epoch seconds)",
            registry=reg,
        ).set(last_success)
    if report is None:
        return reg
    Gauge(
        "probe_generator_overloaded",
        "1 when the probe itself could not keep up during the run (its figures are unknown)",
        registry=reg,
    ).set(1 if generator_overloaded(report) else 0)
    lat = Gauge(
        "probe_hop_latency_seconds",
        "Cumulative latency from send to the hop, by quantile over the run's markers",
        ["hop", "quantile"],
        registry=reg,
    )
    own = Gauge(
        "probe_hop_own_latency_seconds",
        "The hop's own latency (cumulative minus the previous hop's), by quantile",
        ["hop", "quantile"],
        registry=reg,
    )
    sent = Gauge("probe_hop_markers_sent", "Markers owed to the hop", ["hop"], registry=reg)
    seen = Gauge("probe_hop_markers_detected", "Markers the hop delivered", ["hop"], registry=reg)
    for h in report.get("hops", []):
        name = str(h["name"])
        for q, key in QUANTILES:
            if h["latency_ms"].get(key) is not None:
                lat.labels(name, q).set(h["latency_ms"][key] / 1000.0)
            if h["own_latency_ms"].get(key) is not None:
                own.labels(name, q).set(h["own_latency_ms"][key] / 1000.0)
        sent.labels(name).set(h["markers"]["sent"])
        seen.labels(name).set(h["markers"]["detected"])
    s = report.get("sessions", {})
    Gauge("probe_sessions_started", "Sessions started", registry=reg).set(s.get("started", 0))
    Gauge("probe_sessions_completed", "Sessions completed", registry=reg).set(s.get("completed", 0))
    if verdict is not None:
        ok = Gauge("probe_threshold_ok", "1 when the threshold held", ["threshold"], registry=reg)
        for c in verdict.checks:
            ok.labels(c.threshold).set(1 if c.ok else 0)
    return reg
