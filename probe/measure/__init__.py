"""Measurement, sans-I/O: marker sends and detections joined into per-hop latencies, and the report.

- `stats`: exact latency statistics (quantiles, the millisecond summary).
- `registry`: sessions, tokens, marker bookkeeping, measurements and misses, accounting.
- `latency`: pipeline order of hops and each hop's own latency.
- `reply`: voice-to-voice latency from the onset of reply audio.
- `report`: the `probe.report/v1` JSON report and its text table.

No sockets and no asyncio here; time comes from an injected clock or from the caller.
"""

from __future__ import annotations

from probe.measure.latency import RETURN_HOP, hop_order, own_latencies
from probe.measure.registry import (
    ErrorNote,
    HopCounts,
    Measurement,
    Missed,
    SessionCounts,
    SessionRegistry,
    token_for,
)
from probe.measure.reply import MissedReply, ReplyTracker
from probe.measure.report import (
    SCHEMA,
    SeriesRows,
    build_report,
    format_table,
    json_ready,
    load_report,
    write_report,
)
from probe.measure.stats import LatencyStats, summarize_ms

__all__ = [
    "RETURN_HOP",
    "SCHEMA",
    "ErrorNote",
    "HopCounts",
    "LatencyStats",
    "Measurement",
    "Missed",
    "MissedReply",
    "ReplyTracker",
    "SeriesRows",
    "SessionCounts",
    "SessionRegistry",
    "build_report",
    "format_table",
    "hop_order",
    "json_ready",
    "load_report",
    "own_latencies",
    "summarize_ms",
    "token_for",
    "write_report",
]
