"""W3C traceparent / tracestate parsing and formatting."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.errors import ProtocolError
from probe.protocol import (
    TraceContext,
    format_traceparent,
    parse_traceparent,
    validate_tracestate,
)

W3C_EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parses_w3c_example() -> None:
    ctx = parse_traceparent(W3C_EXAMPLE)
    assert ctx == TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)
    assert ctx.sampled
    assert format_traceparent(ctx) == W3C_EXAMPLE
    assert str(ctx) == W3C_EXAMPLE


def test_unsampled_flag() -> None:
    ctx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    assert not ctx.sampled
    assert ctx.flags == 0


def test_unknown_flag_bits_are_kept() -> None:
    ctx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03")
    assert ctx.flags == 3 and ctx.sampled


def test_future_version_extra_fields_ignored() -> None:
    ctx = parse_traceparent(
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds"
    )
    assert ctx.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert ctx.span_id == "00f067aa0ba902b7"
    assert ctx.sampled
    # Re-emitted as the version we implement.
    assert format_traceparent(ctx) == W3C_EXAMPLE


def test_future_version_exact_length() -> None:
    assert parse_traceparent("01" + W3C_EXAMPLE[2:]).span_id == "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "at least 55"),
        (W3C_EXAMPLE[:-1], "at least 55"),
        (W3C_EXAMPLE + "-", "exactly 55"),
        (W3C_EXAMPLE + "-extra", "exactly 55"),
        ("ff" + W3C_EXAMPLE[2:], "ff"),
        ("0g" + W3C_EXAMPLE[2:], "version"),
        ("cc" + W3C_EXAMPLE[2:] + "x", "after the flags"),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "trace id"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01", "parent id"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "all zeros"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "all zeros"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0X", "flags"),
        ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "'-'"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01", "'-'"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01", "'-'"),
    ],
)
def test_invalid_traceparent(value: str, why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_traceparent(value)
    assert "traceparent" in str(info.value)
    assert why in str(info.value)


def test_error_names_given_key() -> None:
    with pytest.raises(ProtocolError, match=r"^start\.customParameters\.traceparent "):
        parse_traceparent("nope", key="start.customParameters.traceparent")


def test_non_string_traceparent() -> None:
    with pytest.raises(ProtocolError, match="traceparent must be a string"):
        parse_traceparent(42)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trace_id": "0" * 32, "span_id": "1" * 16},
        {"trace_id": "A" * 32, "span_id": "1" * 16},
        {"trace_id": "1" * 31, "span_id": "1" * 16},
        {"trace_id": "1" * 32, "span_id": "0" * 16},
        {"trace_id": "1" * 32, "span_id": "1" * 16, "flags": 256},
        {"trace_id": "1" * 32, "span_id": "1" * 16, "flags": -1},
        {"trace_id": "1" * 32, "span_id": "1" * 16, "flags": True},
    ],
)
def test_trace_context_validates_itself(kwargs: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        TraceContext(**kwargs)  # type: ignore[arg-type]


def test_tracestate_is_lenient_but_bounded() -> None:
    assert validate_tracestate("vendor=value") == "vendor=value"
    assert validate_tracestate("anything at all, really") == "anything at all, really"
    assert validate_tracestate("x" * 512) == "x" * 512
    with pytest.raises(ProtocolError, match="tracestate must be at most 512"):
        validate_tracestate("x" * 513)
    with pytest.raises(ProtocolError, match="tracestate must be a string"):
        validate_tracestate(["a"])


hex_digits = "0123456789abcdef"


@given(
    st.text(hex_digits, min_size=32, max_size=32).filter(lambda s: s != "0" * 32),
    st.text(hex_digits, min_size=16, max_size=16).filter(lambda s: s != "0" * 16),
    st.integers(0, 255),
)
def test_round_trip(trace_id: str, span_id: str, flags: int) -> None:
    ctx = TraceContext(trace_id, span_id, flags)
    assert parse_traceparent(format_traceparent(ctx)) == ctx


@given(st.text(max_size=80))
def test_arbitrary_text_only_raises_protocol_error(text: str) -> None:
    with contextlib.suppress(ProtocolError):
        parse_traceparent(text)
