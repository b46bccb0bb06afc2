"""OpenTelemetry tracing set up from the standard ``OTEL_*`` environment, with a bounded flush.

When tracing is on (:func:`probe.telemetry.env.tracing_enabled`), the rest is standard and read
by the SDK itself: ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``): ``grpc`` or
``http/protobuf`` (the default, as the OTel specification says), ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_BSP_*``.

An exporter that cannot reach its collector must never fail or hang a command: export failures
are counted (the exporters' own retry chatter is kept off the terminal unless logging is at
DEBUG) and :meth:`Tracing.close` flushes within a bound and returns one warning sentence, or None
when everything went out. Import this module only when tracing is on: it loads the SDK.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping, Sequence

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from probe.errors import ConfigError
from probe.telemetry.env import (
    check_sampler,
    exporter_names,
    otlp_endpoint,
    otlp_protocol,
    tracing_enabled,
)

__all__ = ["CountingExporter", "Tracing", "start_tracing"]

_QUIET_LOGGERS = ("opentelemetry.exporter.otlp", "opentelemetry.sdk._shared_internal")


class CountingExporter(SpanExporter):
    """Wraps an exporter: counts spans sent and spans lost, and never raises into the SDK."""

    def __init__(self, inner: SpanExporter, where: str) -> None:
        self.inner = inner
        self.where = where
        self.failed = 0
        self.exported = 0
        self.reason: str | None = None
        self._lock = threading.Lock()

    def note(self, exc: BaseException) -> None:
        with self._lock:
            self.reason = self.reason or f"{type(exc).__name__}: {exc}"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter must never break the run
            result = SpanExportResult.FAILURE
            self.note(exc)
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception as exc:
            self.note(exc)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class Tracing:
    """A tracer provider with its batch processors; :meth:`close` flushes within a bound."""

    def __init__(
        self,
        provider: TracerProvider,
        processors: Sequence[BatchSpanProcessor],
        exporters: Sequence[CountingExporter],
    ) -> None:
        self.provider = provider
        self.exporters = list(exporters)
        self._processors = list(processors)
        self._closed = False

    def close(self, timeout_s: float = 5.0) -> str | None:
        """Flush and shut down, waiting at most about ``timeout_s``; never raises. Returns one
        warning sentence when spans could not be exported, else None."""
        if self._closed:
            return None
        self._closed = True
        done = threading.Event()

        def flush() -> None:
            try:
                for p in self._processors:
                    p.force_flush()
                    p.shutdown()  # type: ignore[no-untyped-call]
            except Exception as exc:
                for e in self.exporters:
                    e.note(exc)
            finally:
                done.set()

        # A daemon thread: an exporter stuck in a request cannot keep the command alive.
        threading.Thread(target=flush, name="probe-otel-flush", daemon=True).start()
        finished = done.wait(timeout_s)
        if not finished:
            # Shutting the exporters down interrupts their retry back-off (grpc and http both).
            for e in self.exporters:
                e.shutdown()
            finished = done.wait(1.0)
        for e in self.exporters:
            if e.failed or e.reason or not finished:
                why = f" ({e.reason})" if e.reason else ""
                lost = f"{e.failed} span(s)" if e.failed else "spans"
                if not finished:
                    lost += f" (the flush gave up after {timeout_s:g} s)"
                return (
                    f"warning: {lost} could not be exported to {e.where}{why}; is the OTLP "
                    "collector running? The results are unaffected."
                )
        return None


def start_tracing(
    service: str, *, environ: Mapping[str, str], force_service: bool = False
) -> Tracing | None:
    """A :class:`Tracing` configured from ``environ`` (module docstring), or None when tracing
    is off. ``service`` names the service unless ``OTEL_SERVICE_NAME`` (or ``service.name`` in
    ``OTEL_RESOURCE_ATTRIBUTES``) does; ``force_service`` makes ``service`` win (the reference
    pipeline inside ``probe demo`` is another service than the probe beside it)."""
    if not tracing_enabled(environ):
        return None
    names = exporter_names(environ) or ["otlp"]
    check_sampler(environ)
    protocol = otlp_protocol(environ) if "otlp" in names else ""
    resource = Resource.create({})
    named = str(resource.attributes.get(SERVICE_NAME, ""))
    if force_service or not named or named.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    processors: list[BatchSpanProcessor] = []
    exporters: list[CountingExporter] = []
    for name in dict.fromkeys(names):
        if name == "none":
            continue
        inner: SpanExporter
        if name == "console":
            inner = ConsoleSpanExporter(out=sys.stderr)
            where = "the console"
        else:
            where = otlp_endpoint(environ, protocol)
            inner = _otlp_exporter(protocol, where)
        exporter = CountingExporter(inner, where)
        processor = BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
        processors.append(processor)
        exporters.append(exporter)
    return Tracing(provider, processors, exporters)


def _otlp_exporter(protocol: str, where: str) -> SpanExporter:
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            return GrpcExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    except Exception as exc:
        raise ConfigError(
            f"The OTLP {protocol} exporter cannot be set up for {where} ({exc})."
        ) from None
