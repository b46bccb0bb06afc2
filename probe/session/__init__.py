"""The probe session, sans-I/O: frames, schedule, wire messages and what comes back
(:mod:`probe.session.core`), over one shared carrier (:mod:`probe.session.frames`)."""

from probe.session.core import (
    RETURN_HOP,
    DetectStream,
    ReplyTap,
    ReturnSide,
    Sent,
    SessionCore,
    SessionRecorder,
    SourceConfig,
    new_trace_context,
    target_url,
)
from probe.session.frames import SessionFrames, SharedCarrier, carrier, shared_carrier

__all__ = [
    "RETURN_HOP",
    "DetectStream",
    "ReplyTap",
    "ReturnSide",
    "Sent",
    "SessionCore",
    "SessionFrames",
    "SessionRecorder",
    "SharedCarrier",
    "SourceConfig",
    "carrier",
    "new_trace_context",
    "shared_carrier",
    "target_url",
]
