"""Prometheus metrics of the reference pipeline: how punctually each hop emits; its ground truth.

The pipeline's configured delays are the ground truth a probe run is judged against, so the
pipeline publishes them (``probe_pipeline_configured_delay_seconds{hop}``, cumulative, the sum of
the delays up to and including the hop) together with how late each hop actually emitted its
chunks past their due time (``probe_pipeline_emit_lateness_seconds{hop}``): a dashboard can then
show measured latency beside configured, and whether the pipeline itself kept time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from probe.pipeline.hop import Emission
from probe.pipeline.spec import HopSpec

__all__ = ["LATENESS_BUCKETS", "PipelineMetrics"]

# 50 us to 50 ms: a punctual hop emits well under a millisecond late.
LATENESS_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
)


class PipelineMetrics:
    """Metrics of one pipeline; :meth:`observe` is the pipeline's ``observer`` callback."""

    def __init__(
        self,
        hops: Sequence[HopSpec],
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._hops = {h.name for h in hops}
        self.configured = Gauge(
            "probe_pipeline_configured_delay_seconds",
            "Configured cumulative delay of the reference pipeline up to and including the hop "
            "(the delay in force before any step).",
            ["hop"],
            registry=registry,
        )
        self.lateness = Histogram(
            "probe_pipeline_emit_lateness_seconds",
            "How late a reference-pipeline hop emitted a chunk past its due time.",
            ["hop"],
            buckets=LATENESS_BUCKETS,
            registry=registry,
        )
        self.chunks = Counter(
            "probe_pipeline_chunks",
            "Chunks emitted by each reference-pipeline hop.",
            ["hop"],
            registry=registry,
        )
        self.sessions = Counter(
            "probe_pipeline_sessions",
            "Sessions the reference pipeline has carried (counted at their first emission).",
            registry=registry,
        )
        total = 0.0
        for h in hops:
            total += h.delay
            self.configured.labels(hop=h.name).set(total)
            self.lateness.labels(hop=h.name)
            self.chunks.labels(hop=h.name)
        self._seen: set[str] = set()

    def observe(self, session: str, hop: str, item: Emission) -> None:
        """A hop emitted ``item`` (called by the pipeline right after emitting it)."""
        if hop not in self._hops:
            return
        self.lateness.labels(hop=hop).observe(max(0.0, self._clock() - item.due))
        self.chunks.labels(hop=hop).inc()
        if session not in self._seen:
            self._seen.add(session)
            self.sessions.inc()
            if len(self._seen) > 100_000:
                self._seen.clear()
