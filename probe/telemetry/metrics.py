"""Prometheus metrics made from a run's measurements, and a /metrics server.

===================================  =========  ==================================================
metric                               type       labels
===================================  =========  ==================================================
``probe_hop_latency_seconds``        histogram  hop, target, scenario (exemplar: trace_id)
``probe_hop_own_latency_seconds``    histogram  hop, target, scenario (exemplar: trace_id)
``probe_markers_total``              counter    hop, outcome (detected, missed, unmeasured: owed
                                                while the probe itself was overloaded)
``probe_send_lag_seconds``           histogram  -
``probe_reply_latency_seconds``      histogram  target, scenario (exemplar: trace_id)
``probe_result_latency_seconds``     histogram  target, scenario, kind (interim, final), exemplar:
                                                trace_id; a text result's arrival minus the send
                                                time of the last audio it covers
``probe_results_total``              counter    target, scenario, kind, offsets (yes; no: a result
                                                without offsets, which has no latency)
``probe_first_interim_seconds``      histogram  target, scenario (exemplar: trace_id)
``probe_final_delay_seconds``        histogram  target, scenario (exemplar: trace_id)
``probe_barge_in_latency_seconds``   histogram  target, scenario (exemplar: trace_id)
``probe_barge_in_clear_seconds``     histogram  target, scenario (exemplar: trace_id)
``probe_bot_mark_played_seconds``    histogram  target, scenario (exemplar: trace_id): a bot's
                                                Twilio mark received to its audio played
``probe_conversation_missed_total``  counter    target, scenario, figure (first_interim,
                                                final_delay, barge_in, clear): it never happened
``probe_sessions_total``             counter    outcome (completed, failed)
``probe_active_sessions``            gauge      -
===================================  =========  ==================================================

The conversation figures (:mod:`probe.measure.conversation`) get their series when first
measured, so a run that measures none adds no series.

Latency buckets run from 1 ms to 30 s, dense where audio hops live (10-500 ms). Own latency can
come out slightly negative (two hops' arrival stamps jitter against each other); it is observed as
0 there, since a histogram's ``_sum`` must not go down. Exemplars carry the session's trace id,
so a slow bucket links to its trace; they only appear in the OpenMetrics exposition (Prometheus
asks for it when started with ``--enable-feature=exemplar-storage``).

Cardinality is bounded: ``target`` and ``scenario`` are fixed per observer (the target URL
*template*, never a per-session URL), and at most ``max_hops`` distinct hop names are kept as
label values (64 by default; the protocol allows any name); later ones are counted as ``other``.
A result kind or figure name outside the known ones is counted as ``other`` too.

The metric families of one :class:`~prometheus_client.CollectorRegistry` are made once and shared
by every observer on it (Locust users in one worker, several runs in one process).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from probe.errors import ConfigError
from probe.measure.conversation import FIGURES, RESULT_KINDS, Figure, ResultTiming
from probe.measure.latency import RETURN_HOP
from probe.measure.observe import RunObserver
from probe.measure.registry import Measurement, Missed
from probe.protocol import TraceContext

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER",
    "SEND_LAG_BUCKETS",
    "MetricsObserver",
    "MetricsServer",
    "serve_metrics",
]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0,
)  # fmt: skip
SEND_LAG_BUCKETS: tuple[float, ...] = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
)  # fmt: skip
OTHER = "other"
_MAX_ENDED = 10_000

# Conversation figure -> (histogram name, help).
_FIGURE_METRICS: dict[str, tuple[str, str]] = {
    "first_interim": (
        "probe_first_interim_seconds",
        "An utterance's first speech sample sent to its first interim result.",
    ),
    "final_delay": (
        "probe_final_delay_seconds",
        "An utterance's last speech sample sent to its final result.",
    ),
    "barge_in": (
        "probe_barge_in_latency_seconds",
        "The first barge-in sample sent to the bot's returned audio falling silent.",
    ),
    "clear": (
        "probe_barge_in_clear_seconds",
        "The first barge-in sample sent to the bot's Twilio clear event.",
    ),
    "mark": (
        "probe_bot_mark_played_seconds",
        "A bot's Twilio mark received to the audio before it played out (answered then).",
    ),
}


@dataclass(frozen=True, slots=True)
class _Families:
    latency: Histogram
    own: Histogram
    markers: Counter
    send_lag: Histogram
    reply: Histogram
    result: Histogram
    results: Counter
    figures: dict[str, Histogram]
    figures_missed: Counter
    sessions: Counter
    active: Gauge
    rejected: Counter


_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _families_of(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        found = _families.get(registry)
        if found is None:
            found = _families[registry] = _Families(
                latency=Histogram(
                    "probe_hop_latency_seconds",
                    "Cumulative latency of a marker at a hop: arrival there minus send time.",
                    ["hop", "target", "scenario"],
                    buckets=LATENCY_BUCKETS,
                    registry=registry,
                ),
                own=Histogram(
                    "probe_hop_own_latency_seconds",
                    "A hop's own latency: its cumulative latency minus the previous hop's.",
                    ["hop", "target", "scenario"],
                    buckets=LATENCY_BUCKETS,
                    registry=registry,
                ),
                markers=Counter(
                    "probe_markers",
                    "Markers owed to a hop, by outcome (detected, missed, or unmeasured: owed "
                    "while the probe itself was overloaded).",
                    ["hop", "outcome"],
                    registry=registry,
                ),
                send_lag=Histogram(
                    "probe_send_lag_seconds",
                    "How late the probe handed each audio frame to its socket.",
                    buckets=SEND_LAG_BUCKETS,
                    registry=registry,
                ),
                reply=Histogram(
                    "probe_reply_latency_seconds",
                    "Voice-to-voice latency: end of an utterance to the onset of the reply.",
                    ["target", "scenario"],
                    buckets=LATENCY_BUCKETS,
                    registry=registry,
                ),
                result=Histogram(
                    "probe_result_latency_seconds",
                    "A text result's latency: its arrival minus the send time of the last "
                    "audio it covers, by kind (interim or final).",
                    ["target", "scenario", "kind"],
                    buckets=LATENCY_BUCKETS,
                    registry=registry,
                ),
                results=Counter(
                    "probe_results",
                    "Text results that came back, by kind and whether they carried offsets "
                    "(a result without offsets has no latency).",
                    ["target", "scenario", "kind", "offsets"],
                    registry=registry,
                ),
                figures={
                    name: Histogram(
                        metric,
                        doc,
                        ["target", "scenario"],
                        buckets=LATENCY_BUCKETS,
                        registry=registry,
                    )
                    for name, (metric, doc) in _FIGURE_METRICS.items()
                },
                figures_missed=Counter(
                    "probe_conversation_missed",
                    "Conversation figures that never happened within the marker timeout "
                    "(an utterance never finalized, a bot that never fell silent), by figure.",
                    ["target", "scenario", "figure"],
                    registry=registry,
                ),
                sessions=Counter(
                    "probe_sessions",
                    "Sessions ended, by outcome (completed or failed).",
                    ["outcome"],
                    registry=registry,
                ),
                active=Gauge(
                    "probe_active_sessions",
                    "Sessions started and not yet ended.",
                    registry=registry,
                ),
                rejected=Counter(
                    "probe_forks_rejected",
                    "Fork connections the sink refused, by reason (no or a wrong capability).",
                    ["reason"],
                    registry=registry,
                ),
            )
        return found


class MetricsObserver(RunObserver):
    """Prometheus metrics of a run (module docstring), in ``registry``.

    ``hop_order`` hops get their series made (at zero) up front, so a dashboard and ``rate()``
    see them from the first scrape. Exemplars take the session's trace id from ``trace_lookup``
    (the trace observer's, when tracing is on) or else from the trace context the hops send in
    their fork ``start`` (the same trace id, when the system under test propagates it).
    Thread-safe.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        target: str,
        scenario: str,
        *,
        hop_order: Sequence[str] | None = None,
        trace_lookup: Callable[[str], str | None] | None = None,
        max_hops: int = 64,
        max_sessions: int = 100_000,
    ) -> None:
        self.registry = registry
        self.target = target
        self.scenario = scenario
        self._m = _families_of(registry)
        self._lookup = trace_lookup
        self._max_hops = max(1, max_hops)
        self._max_sessions = max(1, max_sessions)
        self._lock = threading.Lock()
        self._hops: set[str] = set()
        self._active: set[str] = set()
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._traces: OrderedDict[str, str] = OrderedDict()
        for hop in hop_order or ():
            label = self._hop(hop)
            self._m.latency.labels(label, target, scenario)
            self._m.own.labels(label, target, scenario)
            for outcome in ("detected", "missed", "unmeasured"):
                self._m.markers.labels(label, outcome)
        for outcome in ("completed", "failed"):
            self._m.sessions.labels(outcome)
        self._m.reply.labels(target, scenario)

    def _hop(self, hop: str) -> str:
        with self._lock:
            if hop in self._hops:
                return hop
            if len(self._hops) < self._max_hops or hop == RETURN_HOP:
                self._hops.add(hop)
                return hop
        return OTHER

    def _exemplar(self, session: str) -> dict[str, str] | None:
        trace_id = self._lookup(session) if self._lookup is not None else None
        if trace_id is None:
            with self._lock:
                trace_id = self._traces.get(session)
        return {"trace_id": trace_id} if trace_id else None

    def session_started(self, session: str, target: str, at: float) -> TraceContext | None:
        with self._lock:
            fresh = session not in self._active
            self._active.add(session)
        if fresh:
            self._m.active.inc()
        return None

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        with self._lock:
            was_active = session in self._active
            self._active.discard(session)
            first = session not in self._ended
            if first:
                self._ended[session] = None
                while len(self._ended) > _MAX_ENDED:
                    self._ended.popitem(last=False)
            self._traces.pop(session, None)
        if was_active:
            self._m.active.dec()
        # A session is counted once, at its first end (a later error cannot un-count it).
        if first:
            self._m.sessions.labels("failed" if error is not None else "completed").inc()

    def hop_joined(self, hop: str, session: str | None, trace: TraceContext | None) -> None:
        if self._lookup is None and session is not None and trace is not None and trace.sampled:
            with self._lock:
                if session in self._active:
                    self._traces[session] = trace.trace_id
                    while len(self._traces) > self._max_sessions:
                        self._traces.popitem(last=False)

    def detected(self, m: Measurement, own_s: float | None) -> None:
        hop = self._hop(m.hop)
        exemplar = self._exemplar(m.session)
        self._m.latency.labels(hop, self.target, self.scenario).observe(
            max(0.0, m.latency_s), exemplar
        )
        if own_s is not None:
            self._m.own.labels(hop, self.target, self.scenario).observe(max(0.0, own_s), exemplar)
        self._m.markers.labels(hop, "detected").inc()

    def missed(self, m: Missed) -> None:
        self._m.markers.labels(self._hop(m.hop), "unmeasured" if m.unmeasured else "missed").inc()

    def fork_rejected(self, reason: str) -> None:
        self._m.rejected.labels(reason).inc()

    def send_lag(self, session: str, lag_s: float) -> None:
        self._m.send_lag.observe(max(0.0, lag_s))

    def reply(self, session: str, utterance_end: float, latency_s: float | None) -> None:
        if latency_s is not None:
            self._m.reply.labels(self.target, self.scenario).observe(
                max(0.0, latency_s), self._exemplar(session)
            )

    def result(self, r: ResultTiming) -> None:
        kind = r.kind if r.kind in RESULT_KINDS else OTHER
        placed = r.latency_s is not None
        self._m.results.labels(self.target, self.scenario, kind, "yes" if placed else "no").inc()
        if r.latency_s is not None:
            self._m.result.labels(self.target, self.scenario, kind).observe(
                max(0.0, r.latency_s), self._exemplar(r.session)
            )

    def figure(self, f: Figure) -> None:
        if f.latency_s is None:
            name = f.name if f.name in FIGURES else OTHER
            self._m.figures_missed.labels(self.target, self.scenario, name).inc()
            return
        histogram = self._m.figures.get(f.name)
        if histogram is not None:
            histogram.labels(self.target, self.scenario).observe(
                max(0.0, f.latency_s), self._exemplar(f.session)
            )


class MetricsServer:
    """A running /metrics endpoint (prometheus_client's threaded WSGI server)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self.url = url

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: a free one); both the text
    format and, when asked, OpenMetrics (with exemplars)."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--metrics-listen cannot listen on {host}:{port} ({why}).") from None
    bound_host = str(server.server_address[0])
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return MetricsServer(server, thread, f"http://{shown}:{server.server_port}/metrics")
