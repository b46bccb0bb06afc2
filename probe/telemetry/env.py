"""Which traces the standard ``OTEL_*`` environment asks for: read and checked, nothing imported.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set, or ``OTEL_TRACES_EXPORTER`` names ``otlp`` and/or ``console``; ``OTEL_TRACES_EXPORTER=none``
or ``OTEL_SDK_DISABLED=true`` turn it off. This module imports no OpenTelemetry code, so a
command with tracing off pays nothing for it. Bad values are a :class:`ConfigError` sentence.
"""

from __future__ import annotations

from collections.abc import Mapping

from probe.errors import ConfigError

__all__ = ["check_sampler", "exporter_names", "otlp_endpoint", "otlp_protocol", "tracing_enabled"]

_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("grpc", "http/protobuf")
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for n in names:
        if n not in _EXPORTERS:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER names {n!r}; the probe exports traces with "
                "otlp, console or none."
            )
    return names


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = exporter_names(environ)
    if names:
        return any(n != "none" for n in names)
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def otlp_protocol(environ: Mapping[str, str]) -> str:
    key = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    if not environ.get(key, "").strip():
        key = "OTEL_EXPORTER_OTLP_PROTOCOL"
    value = environ.get(key, "").strip().lower() or "http/protobuf"
    if value not in _PROTOCOLS:
        raise ConfigError(f"{key} must be grpc or http/protobuf, got {value!r}.")
    return value


def check_sampler(environ: Mapping[str, str]) -> None:
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name and name not in _SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER must be one of {', '.join(_SAMPLERS)}, got {name!r}."
        )
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if arg and name.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1, got {arg!r}.")


def otlp_endpoint(environ: Mapping[str, str], protocol: str) -> str:
    specific = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if specific:
        return specific
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if protocol == "grpc":
        return base or "http://localhost:4317"
    return (base.rstrip("/") + "/v1/traces") if base else "http://localhost:4318/v1/traces"
