"""W3C Trace Context (https://www.w3.org/TR/trace-context/): parse and build `traceparent`.

The probe carries its trace context in the first message of a stream (PROTOCOL.md 1.1), because
browsers cannot set headers on a WebSocket handshake. Parsing follows the W3C rules: version `00`
is exactly 55 characters, a later version (never `ff`) is read from its first 55 characters with
anything after a `-` ignored, ids are lowercase hex and never all zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from probe.errors import ProtocolError
from probe.protocol._util import show as _show

__all__ = [
    "FLAG_SAMPLED",
    "TRACESTATE_MAX_LENGTH",
    "TraceContext",
    "format_traceparent",
    "parse_traceparent",
    "validate_tracestate",
]

FLAG_SAMPLED = 0x01
TRACESTATE_MAX_LENGTH = 512

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_HEX2 = re.compile(r"[0-9a-f]{2}")
_VERSION_00_LENGTH = 55


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's W3C trace context: ids as lowercase hex, flags as an 8-bit integer."""

    trace_id: str
    span_id: str
    flags: int = FLAG_SAMPLED

    def __post_init__(self) -> None:
        if not isinstance(self.trace_id, str) or not _TRACE_ID.fullmatch(self.trace_id):
            raise ProtocolError(
                f"trace_id must be 32 lowercase hex digits, got {_show(self.trace_id)}."
            )
        if self.trace_id == "0" * 32:
            raise ProtocolError("trace_id must not be all zeros.")
        if not isinstance(self.span_id, str) or not _SPAN_ID.fullmatch(self.span_id):
            raise ProtocolError(
                f"span_id must be 16 lowercase hex digits, got {_show(self.span_id)}."
            )
        if self.span_id == "0" * 16:
            raise ProtocolError("span_id must not be all zeros.")
        if (
            not isinstance(self.flags, int)
            or isinstance(self.flags, bool)
            or not 0 <= self.flags <= 0xFF
        ):
            raise ProtocolError(f"flags must be an integer from 0 to 255, got {_show(self.flags)}.")

    @property
    def sampled(self) -> bool:
        """Whether the caller recorded this span (the W3C `sampled` flag)."""
        return bool(self.flags & FLAG_SAMPLED)

    def __str__(self) -> str:
        return format_traceparent(self)


def parse_traceparent(value: object, *, key: str = "traceparent") -> TraceContext:
    """Parse a `traceparent` value; `key` names it in the error (e.g. a JSON path)."""
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string, got {_show(value)}.")
    bad = f"{key} is not a valid W3C traceparent ({_show(value)})"
    if len(value) < _VERSION_00_LENGTH:
        raise ProtocolError(
            f"{bad}: it must be at least 55 characters, like 00-<32 hex>-<16 hex>-01."
        )
    version = value[0:2]
    if not _HEX2.fullmatch(version):
        raise ProtocolError(f"{bad}: the version must be two lowercase hex digits.")
    if version == "ff":
        raise ProtocolError(f"{bad}: version ff is forbidden by the W3C specification.")
    if version == "00" and len(value) != _VERSION_00_LENGTH:
        raise ProtocolError(f"{bad}: version 00 must be exactly 55 characters.")
    if len(value) > _VERSION_00_LENGTH and value[_VERSION_00_LENGTH] != "-":
        raise ProtocolError(f"{bad}: fields after the flags must follow a '-'.")
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        raise ProtocolError(f"{bad}: fields must be separated by '-' at the W3C positions.")
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if not _TRACE_ID.fullmatch(trace_id):
        raise ProtocolError(f"{bad}: the trace id must be 32 lowercase hex digits.")
    if trace_id == "0" * 32:
        raise ProtocolError(f"{bad}: the trace id must not be all zeros.")
    if not _SPAN_ID.fullmatch(span_id):
        raise ProtocolError(f"{bad}: the parent id must be 16 lowercase hex digits.")
    if span_id == "0" * 16:
        raise ProtocolError(f"{bad}: the parent id must not be all zeros.")
    if not _HEX2.fullmatch(flags):
        raise ProtocolError(f"{bad}: the flags must be two lowercase hex digits.")
    return TraceContext(trace_id, span_id, int(flags, 16))


def format_traceparent(ctx: TraceContext) -> str:
    """The version-00 `traceparent` string of `ctx` (we always emit the version we implement)."""
    return f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.flags:02x}"


def validate_tracestate(value: object, *, key: str = "tracestate") -> str:
    """Return `value` if it is acceptable as a `tracestate`.

    Deliberately lenient: `tracestate` is opaque vendor data passed along unchanged, so only its
    type and the W3C size bound (512 characters) are checked.
    """
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string, got {_show(value)}.")
    if len(value) > TRACESTATE_MAX_LENGTH:
        raise ProtocolError(
            f"{key} must be at most {TRACESTATE_MAX_LENGTH} characters, got {len(value)}."
        )
    return value
