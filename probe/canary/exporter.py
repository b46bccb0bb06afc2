"""``probe exporter``: canaries that Prometheus schedules itself, like blackbox_exporter.

``GET /probe?target=URL&scenario=NAME`` runs one short probe (the scenario's settings and
thresholds, the target from the query or else the scenario) and answers in the Prometheus text
format: ``probe_success``, ``probe_duration_seconds``, per-hop latency quantiles (see
:mod:`probe.canary.metrics`). A target that is down is ``probe_success 0`` with HTTP 200, as
blackbox_exporter does; a bad query is HTTP 400 with one sentence. At most ``max_probes`` run at
once; a request that cannot start within ``queue_timeout_s`` gets HTTP 503. ``GET /metrics`` is
the exporter's own health (probes by result, probes in flight, rejected requests, probe time).

:class:`ProbeExporter` is the logic, independent of HTTP (query text in; status, content type and
body out); :func:`serve_exporter` is the thin ``http.server`` shell around it. Each probe runs its
own asyncio loop in the request's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from probe.aio.runner import RunConfig, run_probe
from probe.canary.metrics import generator_overloaded, probe_registry
from probe.canary.scenario import Scenario
from probe.canary.thresholds import Threshold, Verdict, judge
from probe.errors import ConfigError, ProbeError

__all__ = ["ExporterResponse", "ProbeExporter", "serve_exporter"]

log = logging.getLogger(__name__)

_PARAMS = ("target", "scenario")
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class ExporterResponse:
    status: int
    content_type: str
    body: bytes


class ProbeExporter:
    """The exporter's logic. ``build_config`` turns merged options (``probe run`` option names)
    into a :class:`RunConfig` or raises :class:`ConfigError`; ``defaults`` are the options a
    probe starts from before its scenario and query apply."""

    def __init__(
        self,
        scenarios: Mapping[str, Scenario],
        build_config: Callable[[Mapping[str, Any]], RunConfig],
        *,
        defaults: Mapping[str, Any],
        max_probes: int = 2,
        queue_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_probes < 1:
            raise ConfigError("--max-probes must be at least 1.")
        if queue_timeout_s < 0:
            raise ConfigError("--queue-timeout must be 0 or more seconds.")
        self.scenarios = dict(scenarios)
        self.build_config = build_config
        self.defaults = dict(defaults)
        self.max_probes = max_probes
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock
        self._slots = threading.BoundedSemaphore(max_probes)
        self.registry = CollectorRegistry(auto_describe=True)
        self._probes = Counter(
            "probe_exporter_probes",
            "Probe requests answered, by result (success, failure, bad_request, rejected)",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure", "bad_request", "rejected"):
            self._probes.labels(result)
        self._in_flight = Gauge(
            "probe_exporter_probes_in_flight", "Probes running now", registry=self.registry
        )
        Gauge("probe_exporter_max_probes", "Probes allowed at once", registry=self.registry).set(
            max_probes
        )
        self._seconds = Histogram(
            "probe_exporter_probe_duration_seconds",
            "Wall time of the probes run",
            buckets=(1, 2, 3, 5, 8, 10, 15, 20, 30, 60, 120),
            registry=self.registry,
        )

    def plan(self, query: str) -> tuple[RunConfig, list[Threshold], str]:
        """Query text to (run config, thresholds, target); ConfigError names the problem."""
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise ConfigError(f"The query {query!r} is not a valid query string.") from None
        for key, values in params.items():
            if key not in _PARAMS:
                raise ConfigError(
                    f"Unknown query parameter {key!r}; /probe takes target and scenario."
                )
            if len(values) != 1:
                raise ConfigError(f"Query parameter {key!r} is given {len(values)} times.")
        opts = dict(self.defaults)
        thresholds: list[Threshold] = []
        name = params.get("scenario", [""])[0]
        if name:
            scenario = self.scenarios.get(name)
            if scenario is None:
                known = ", ".join(sorted(self.scenarios)) or "none loaded"
                raise ConfigError(f"Unknown scenario {name!r} (known: {known}).")
            opts.update(scenario.options)
            thresholds = list(scenario.thresholds)
        target = params.get("target", [""])[0]
        if target:
            opts["target"] = target
        if not opts.get("target"):
            raise ConfigError(
                "Give a target: /probe?target=ws://HOST:PORT/... (or a scenario with one)."
            )
        return self.build_config(opts), thresholds, str(opts["target"])

    def probe(self, query: str, scrape_timeout_s: float | None = None) -> ExporterResponse:
        """Answer ``GET /probe?<query>``; ``scrape_timeout_s`` is Prometheus' scrape timeout
        (its ``X-Prometheus-Scrape-Timeout-Seconds`` header), which the answer must beat."""
        try:
            cfg, thresholds, target = self.plan(query)
            if scrape_timeout_s is not None:
                cfg = fit_timeout(cfg, scrape_timeout_s)
        except ConfigError as exc:
            self._probes.labels("bad_request").inc()
            return ExporterResponse(400, TEXT, f"{exc}\n".encode())
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            self._probes.labels("rejected").inc()
            msg = (
                f"{self.max_probes} probes are already running and none finished within "
                f"{self.queue_timeout_s:g} s; try again later.\n"
            )
            return ExporterResponse(503, TEXT, msg.encode())
        try:
            with self._in_flight.track_inprogress():
                report, verdict, elapsed = self._run(cfg, thresholds)
        finally:
            self._slots.release()
        # An overloaded probe measured itself: no verdict, so no success either.
        success = verdict is not None and verdict.ok and not generator_overloaded(report)
        self._probes.labels("success" if success else "failure").inc()
        self._seconds.observe(elapsed)
        if generator_overloaded(report):
            log.warning("probe of %s: the probe itself was overloaded; no verdict", target)
        if verdict is not None:
            for c in verdict.breaches:
                log.info("probe of %s: %s: %s", target, c.threshold, c.detail)
        reg = probe_registry(report, verdict, duration_s=elapsed, success=success)
        return ExporterResponse(200, CONTENT_TYPE_LATEST, generate_latest(reg))

    def _run(
        self, cfg: RunConfig, thresholds: list[Threshold]
    ) -> tuple[dict[str, Any] | None, Verdict | None, float]:
        t0 = time.monotonic()
        try:
            report = asyncio.run(run_probe(cfg, clock=self.clock))
        except ProbeError as exc:
            log.warning("probe of %s could not run: %s", cfg.source.target, exc)
            return None, None, time.monotonic() - t0
        return report, judge(report, thresholds), time.monotonic() - t0

    def metrics(self) -> ExporterResponse:
        return ExporterResponse(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))

    def index(self) -> ExporterResponse:
        names = ", ".join(sorted(self.scenarios)) or "none"
        text = (
            "probe exporter\n"
            "GET /probe?target=ws://HOST:PORT/PATH&scenario=NAME  runs one probe\n"
            "GET /metrics  the exporter's own metrics\n"
            f"scenarios: {names}\n"
        )
        return ExporterResponse(200, TEXT, text.encode())

    def handle(
        self, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> ExporterResponse:
        """Route one request (``path`` with its query)."""
        parts = urlsplit(path)
        if method not in ("GET", "HEAD"):
            return ExporterResponse(405, TEXT, b"Only GET is supported.\n")
        if parts.path == "/probe":
            raw = (headers or {}).get(SCRAPE_TIMEOUT_HEADER)
            try:
                timeout = float(raw) if raw else None
            except ValueError:
                timeout = None
            return self.probe(parts.query, timeout)
        if parts.path == "/metrics":
            return self.metrics()
        if parts.path == "/":
            return self.index()
        return ExporterResponse(404, TEXT, f"No such page: {parts.path}; try /probe.\n".encode())


SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
# Kept free of the scrape timeout, as blackbox_exporter's --timeout-offset: the answer must be
# written and read before Prometheus gives up.
TIMEOUT_OFFSET_S = 0.5
# Beside its sessions, a probe spends up to this long starting the sink process and settling.
_OVERHEAD_S = 2.0
_MIN_WAIT_S = 0.5  # the least drain and marker timeout worth running with


def fit_timeout(cfg: RunConfig, scrape_timeout_s: float) -> RunConfig:
    """``cfg`` with its drain and marker timeout cut so the probe answers within the scrape
    timeout; a ConfigError (HTTP 400) when even its sessions cannot fit."""
    budget = scrape_timeout_s - TIMEOUT_OFFSET_S
    src = cfg.source
    waves = -(-cfg.sessions // max(1, cfg.concurrency))
    rest = budget - waves * src.duration_s - _OVERHEAD_S
    if rest < 2 * _MIN_WAIT_S * waves:
        need = waves * src.duration_s + _OVERHEAD_S + 2 * _MIN_WAIT_S * waves
        raise ConfigError(
            f"The probe needs at least {need + TIMEOUT_OFFSET_S:.1f} s ({waves} x "
            f"{src.duration_s:g} s of sessions, start-up, draining and settling) but Prometheus "
            f"allows {scrape_timeout_s:g} s; raise scrape_timeout or shorten the scenario."
        )
    drain = min(src.drain_s, max(_MIN_WAIT_S, 0.4 * rest / waves))
    marker_timeout = min(cfg.marker_timeout_s, max(_MIN_WAIT_S, rest - waves * drain))
    if drain == src.drain_s and marker_timeout == cfg.marker_timeout_s:
        return cfg
    return replace(cfg, source=replace(src, drain_s=drain), marker_timeout_s=marker_timeout)


class _Handler(BaseHTTPRequestHandler):
    exporter: ProbeExporter
    protocol_version = "HTTP/1.1"

    def _answer(self, method: str) -> None:
        resp = self.exporter.handle(method, self.path, dict(self.headers.items()))
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(resp.body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def serve_exporter(exporter: ProbeExporter, host: str, port: int) -> ThreadingHTTPServer:
    """Bind the HTTP shell (port 0: any free port); the caller runs ``serve_forever``."""
    handler = type("ExporterHandler", (_Handler,), {"exporter": exporter})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise ConfigError(
            f"The exporter cannot listen on {host}:{port} ({exc.strerror})."
        ) from None
    server.daemon_threads = True
    return server
