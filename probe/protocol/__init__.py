"""The probe's wire protocol (PROTOCOL.md), sans-I/O: text and bytes in, typed events out.

- `trace`: W3C Trace Context (`traceparent`, `tracestate`).
- `messages`: the start / stop messages of ingress, fork and return streams; close codes.
- `streams`: receivers that enforce the order of frames on one connection.
- `twilio`: the Twilio Media Streams dialect.

No sockets and no asyncio here: the I/O shells move frames, this package judges them.
"""

from __future__ import annotations

from probe.protocol.messages import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    ENCODINGS,
    MAX_CLOSE_REASON_BYTES,
    SAMPLE_RATE_MAX,
    SAMPLE_RATE_MIN,
    AudioFormat,
    Encoding,
    ForkStart,
    IngressStart,
    Message,
    ProtocolViolation,
    ReturnStart,
    Role,
    Stop,
    Unknown,
    decode_object,
    parse_audio_format,
    parse_message,
    to_json,
)
from probe.protocol.streams import (
    Audio,
    Event,
    ForkEvent,
    ForkReceiver,
    IngressEvent,
    IngressReceiver,
    ReturnEvent,
    ReturnReceiver,
    Started,
    Stopped,
)
from probe.protocol.trace import (
    FLAG_SAMPLED,
    TRACESTATE_MAX_LENGTH,
    TraceContext,
    format_traceparent,
    parse_traceparent,
    validate_tracestate,
)
from probe.protocol.twilio import (
    DEFAULT_ACCOUNT_SID,
    TWILIO_AUDIO,
    TWILIO_ENCODING,
    Clear,
    Mark,
    TwilioEvent,
    TwilioReceiver,
    TwilioResponder,
    TwilioReturnEvent,
    TwilioReturnReceiver,
    TwilioSender,
)

__all__ = [
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_UNSUPPORTED",
    "DEFAULT_ACCOUNT_SID",
    "ENCODINGS",
    "FLAG_SAMPLED",
    "MAX_CLOSE_REASON_BYTES",
    "SAMPLE_RATE_MAX",
    "SAMPLE_RATE_MIN",
    "TRACESTATE_MAX_LENGTH",
    "TWILIO_AUDIO",
    "TWILIO_ENCODING",
    "Audio",
    "AudioFormat",
    "Clear",
    "Encoding",
    "Event",
    "ForkEvent",
    "ForkReceiver",
    "ForkStart",
    "IngressEvent",
    "IngressReceiver",
    "IngressStart",
    "Mark",
    "Message",
    "ProtocolViolation",
    "ReturnEvent",
    "ReturnReceiver",
    "ReturnStart",
    "Role",
    "Started",
    "Stop",
    "Stopped",
    "TraceContext",
    "TwilioEvent",
    "TwilioReceiver",
    "TwilioResponder",
    "TwilioReturnEvent",
    "TwilioReturnReceiver",
    "TwilioSender",
    "Unknown",
    "decode_object",
    "format_traceparent",
    "parse_audio_format",
    "parse_message",
    "parse_traceparent",
    "to_json",
    "validate_tracestate",
]
