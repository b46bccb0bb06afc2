"""Telemetry for a command: traces when the ``OTEL_*`` environment asks, metrics always.

The edge where the environment is read (DESIGN.md): :func:`start_telemetry` gives a
:class:`Telemetry` whose ``observer`` goes to :func:`probe.aio.runner.run_probe` (or a Locust user),
and whose :meth:`Telemetry.close` is called in a ``finally``. Tracing is on only when the
environment configures it (:mod:`probe.telemetry.env`); off, no OpenTelemetry code is imported
and nothing is exported. Metrics go to ``registry`` (prometheus_client's default registry when
None) and are served at ``--metrics-listen HOST:PORT`` when given (port 0: a free port, the URL
is in ``metrics_url``); ``serve=False`` leaves serving to the caller (Locust mounts them itself).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TextIO

from prometheus_client import REGISTRY, CollectorRegistry

from probe.config import parse_host_port
from probe.errors import ConfigError
from probe.measure.observe import Observers, RunObserver
from probe.telemetry.env import tracing_enabled
from probe.telemetry.metrics import MetricsObserver, MetricsServer, serve_metrics

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from probe.telemetry.otel import Tracing

__all__ = [
    "Telemetry",
    "add_telemetry_options",
    "start_pipeline_tracing",
    "start_telemetry",
]


def add_telemetry_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--metrics-listen HOST:PORT`` (traces are configured by the ``OTEL_*`` variables)."""
    parser.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics during the run (port 0: any)",
    )


class Telemetry:
    """What :func:`start_telemetry` started: ``observer`` for the run, ``close()`` at the end."""

    def __init__(
        self,
        observer: Observers,
        metrics: MetricsObserver,
        tracing: Tracing | None,
        server: MetricsServer | None,
        *,
        flush_timeout_s: float,
        stderr: TextIO | None,
    ) -> None:
        self.observer = observer
        self.metrics = metrics
        self.tracing = tracing
        self.metrics_url: str | None = server.url if server is not None else None
        self._server = server
        self._flush_timeout_s = flush_timeout_s
        self._stderr = stderr
        self._closed = False
        self._more: list[Tracing] = []

    def attach(self, tracing: Tracing | None) -> None:
        """Close ``tracing`` (another service's, e.g. the demo's pipeline) with this one."""
        if tracing is not None:
            self._more.append(tracing)

    @property
    def tracer_provider(self) -> TracerProvider | None:
        return self.tracing.provider if self.tracing is not None else None

    def close(self) -> None:
        """End open spans, flush them within a bound, stop serving metrics. Never raises; prints
        one warning line to stderr when spans could not be exported."""
        if self._closed:
            return
        self._closed = True
        try:
            self.observer.close()
        except Exception as exc:  # close must never raise
            self._warn(f"warning: telemetry did not close cleanly ({exc}).")
        tracings = [t for t in (self.tracing, *self._more) if t is not None]
        warnings: list[str | None] = [None] * len(tracings)

        def flush(i: int) -> None:
            warnings[i] = tracings[i].close(self._flush_timeout_s)

        # Flushed side by side: an unreachable collector costs one flush bound, not one each.
        threads = [threading.Thread(target=flush, args=(i,), daemon=True)
                   for i in range(len(tracings))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self._flush_timeout_s + 2.0)
        first = next((w for w in warnings if w), None)
        if first:
            self._warn(first)
        if self._server is not None:
            try:
                self._server.close()
            except Exception as exc:
                self._warn(f"warning: the metrics server did not stop cleanly ({exc}).")

    def _warn(self, text: str) -> None:
        stream = self._stderr if self._stderr is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):
            print(f"probe: {text}", file=stream, flush=True)


def start_pipeline_tracing(
    service: str = "probe-pipeline",
    *,
    environ: Mapping[str, str] | None = None,
    force_service: bool = False,
) -> Tracing | None:
    """Tracing for the reference pipeline (its own spans), or None when the environment does
    not configure it. ``close(timeout_s)`` on the result returns a warning sentence or None."""
    env = os.environ if environ is None else environ
    if not tracing_enabled(env):
        return None
    from probe.telemetry.otel import start_tracing

    return start_tracing(service, environ=env, force_service=force_service)


def start_telemetry(
    *,
    service: str,
    target: str,
    scenario: str,
    metrics_listen: str | None,
    hop_order: Sequence[str] | None,
    registry: CollectorRegistry | None = None,
    serve: bool = True,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    flush_timeout_s: float = 5.0,
    stderr: TextIO | None = None,
) -> Telemetry:
    """Start a command's telemetry (module docstring).

    ``service`` is the OTel service name unless ``OTEL_SERVICE_NAME`` says otherwise; ``target``
    (the URL template) and ``scenario`` label the metrics; ``hop_order`` orders own latency and
    pre-makes the hops' series. Bad ``OTEL_*`` values or an unusable ``metrics_listen`` raise
    :class:`ConfigError`."""
    env = os.environ if environ is None else environ
    tracing: Tracing | None = None
    observers: list[RunObserver] = []
    lookup: Callable[[str], str | None] | None = None
    if tracing_enabled(env):
        from probe.telemetry.otel import start_tracing
        from probe.telemetry.traces import TraceObserver

        tracing = start_tracing(service, environ=env)
        if tracing is not None:
            tracer = TraceObserver(tracing.provider, clock=clock)
            observers.append(tracer)
            lookup = tracer.trace_id
    metrics = MetricsObserver(
        registry if registry is not None else REGISTRY,
        target,
        scenario,
        hop_order=hop_order,
        trace_lookup=lookup,
    )
    observers.append(metrics)
    server: MetricsServer | None = None
    if serve and metrics_listen:
        try:
            host, port = parse_host_port(metrics_listen, "--metrics-listen")
            server = serve_metrics(metrics.registry, host, port)
        except ConfigError:
            if tracing is not None:
                tracing.close(0.5)
            raise
    return Telemetry(
        Observers(observers, hop_order=hop_order, lock=threading.Lock()),
        metrics,
        tracing,
        server,
        flush_timeout_s=flush_timeout_s,
        stderr=stderr,
    )
