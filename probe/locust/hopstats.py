"""Exact per-hop statistics for the Locust Hops tab, mergeable across worker processes (sans-I/O).

Locust keeps response times rounded to two significant digits; a 137.4 ms hop shows as 140 ms.
:class:`HopsStats` counts every latency (cumulative and own, per hop) to the microsecond
(:class:`~probe.measure.stats.MicrosecondCounts`), so the p99.9 of the Hops tab is the sample's
own p99.9 to the 0.001 ms it shows, like the ``probe.report/v1`` report, in memory that does not
grow with the length of the run.

In a distributed run each worker ships what it measured since its last report
(:meth:`HopsStats.take_report`: new latency values, and its running totals of markers and
sessions); the master merges them (:meth:`HopsStats.merge_report`), summing the latest totals of
every worker it has heard from. Frame send lags are many (50 a second per stream), so they are
kept as counts per 10 microseconds, exact to that resolution.

The process with the web UI also keeps each hop's own p95 over time (:class:`OwnP95Series`, for
the Hops tab's picture): where the own latencies arrive, with no thread or timer of its own.

The report is plain lists, dicts and numbers: it travels in Locust's msgpack messages.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from probe.measure.latency import RETURN_HOP
from probe.measure.stats import MicrosecondCounts

__all__ = [
    "COLUMNS",
    "LAG_RESOLUTION_S",
    "HopsStats",
    "LagHistogram",
    "OwnP95Series",
    "Totals",
]

LAG_RESOLUTION_S = 1e-5

# (key, title) of the Hops table; keys are plain lowercase words (the web UI camel-cases keys).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "Hop"),
    ("sent", "Markers sent"),
    ("detected", "Detected"),
    ("missed", "Missed"),
    ("unmeasured", "Unmeasured"),
    ("pending", "Pending"),
    ("p50", "p50 ms"),
    ("p90", "p90 ms"),
    ("p95", "p95 ms"),
    ("p99", "p99 ms"),
    ("p999", "p99.9 ms"),
    ("max", "max ms"),
    ("ownp50", "own p50 ms"),
    ("ownp90", "own p90 ms"),
    ("ownp95", "own p95 ms"),
    ("ownp99", "own p99 ms"),
    ("ownp999", "own p99.9 ms"),
    ("ownmax", "own max ms"),
    ("note", "Note"),
)
_PCTS = ("p50", "p90", "p95", "p99", "p999", "max")
_COUNTS = ("sent", "detected", "missed", "unmeasured", "pending")
_SESSION_KEYS = ("started", "completed", "failed", "active", "late_starts")


class LagHistogram:
    """Send lags as counts per :data:`LAG_RESOLUTION_S` (quantiles exact to that resolution)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, lag_s: float) -> None:
        b = max(0, int(round(lag_s / LAG_RESOLUTION_S)))
        self.counts[b] = self.counts.get(b, 0) + 1
        self.n += 1

    def merge(self, counts: Mapping[int | str, int]) -> None:
        for b, c in counts.items():
            k = int(b)
            self.counts[k] = self.counts.get(k, 0) + int(c)
            self.n += int(c)

    def summary_ms(self) -> dict[str, float | int | None]:
        """p50 ... p99.9 and max (ms, upper edge of the bucket holding the rank), and count."""
        out: dict[str, float | int | None] = dict.fromkeys(_PCTS)
        out["count"] = self.n
        if not self.n:
            return out
        keys = sorted(self.counts)
        ranks = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}
        targets = {k: max(1, math.ceil(q * self.n)) for k, q in ranks.items()}
        seen = 0
        for b in keys:
            seen += self.counts[b]
            for k, t in targets.items():
                if out[k] is None and seen >= t:
                    out[k] = round(b * LAG_RESOLUTION_S * 1000.0, 3)
        out["max"] = round(keys[-1] * LAG_RESOLUTION_S * 1000.0, 3)
        return out


class OwnP95Series:
    """Each hop's own p95 over time: one point per clock-aligned window of ``every_s`` seconds.

    A window's values close into a point (stamped at the window's end: the p95 per hop, ms) when
    a later value or a look (:meth:`snapshot`) comes after that end; a window without values
    leaves no point, so a pause shows as a gap. Points older than ``keep_s`` are dropped, so
    memory is bounded whatever the run's length. On a master the values come with the workers'
    reports (every 3 s), so a point there counts values by when the master heard of them."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        every_s: float = 5.0,
        keep_s: float = 1800.0,
    ) -> None:
        self.clock = clock
        self.every_s = every_s
        self.keep_s = keep_s
        self._points: deque[tuple[float, dict[str, float]]] = deque(
            maxlen=max(1, int(keep_s / every_s))
        )
        self._window = -1
        self._open: dict[str, MicrosecondCounts] = {}

    def add(self, hop: str, own_s: float) -> None:
        self.extend(hop, (own_s,))

    def extend(self, hop: str, own_s: Iterable[float]) -> None:
        self._roll(self.clock())
        self._open.setdefault(hop, MicrosecondCounts()).extend(own_s)

    def snapshot(self) -> tuple[float, list[tuple[float, dict[str, float]]]]:
        """The time now and the points of the last ``keep_s``, oldest first."""
        now = self.clock()
        self._roll(now)
        while self._points and self._points[0][0] < now - self.keep_s:
            self._points.popleft()
        return now, list(self._points)

    def clear(self) -> None:
        self._points.clear()
        self._open = {}

    def _roll(self, now: float) -> None:
        window = int(now // self.every_s)
        if window == self._window:
            return
        if self._open:
            p95 = {h: round(1000.0 * (c.quantile(0.95) or 0.0), 3) for h, c in self._open.items()}
            self._points.append(((self._window + 1) * self.every_s, p95))
            self._open = {}
        self._window = window


@dataclass
class Totals:
    """Running totals one process reports: marker accounting per hop and sessions."""

    markers: dict[str, dict[str, int]] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"markers": self.markers, "sessions": self.sessions}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Totals:
        markers = {
            str(h): {k: int(v) for k, v in c.items()} for h, c in dict(d.get("markers", {})).items()
        }
        sessions = {str(k): int(v) for k, v in dict(d.get("sessions", {})).items()}
        return cls(markers, sessions)


class HopsStats:
    """Exact latency values per hop, send lags, and the totals of every reporting process.

    Own latency (a hop's cumulative latency minus that of the hop before it, for the same
    marker) comes with each detection from :class:`~probe.measure.observe.Observers`, joined by
    the one rule the report and telemetry use (:class:`~probe.measure.latency.OwnLatencyJoin`).
    With a ``series``, own latencies also go into it (on the process with the web UI).
    Not thread-safe: the Locust integration uses it from the gevent hub only."""

    def __init__(
        self,
        hop_order: Sequence[str] = (),
        *,
        for_master: bool = False,
        series: OwnP95Series | None = None,
    ) -> None:
        self.hop_order = list(hop_order)
        # A worker keeps what it measured since its last report for its master; a master or a
        # local run keeps nothing twice.
        self.for_master = for_master
        self.series = series
        self.reset()

    def reset(self) -> None:
        self.cumulative: dict[str, MicrosecondCounts] = {}
        self.own: dict[str, MicrosecondCounts] = {}
        self.lag = LagHistogram()
        # Totals per source (a worker id, or "local"), the latest each has reported.
        self.totals: dict[str, Totals] = {}
        # What this process measured and has not reported yet (workers only).
        self._new_cum: dict[str, list[float]] = {}
        self._new_own: dict[str, list[float]] = {}
        self._new_lag: dict[int, int] = {}
        if self.series is not None:
            self.series.clear()

    # -- one process ----------------------------------------------------------------------------

    def add_detection(self, hop: str, latency_s: float, own_s: float) -> None:
        """A marker seen on ``hop``: its cumulative and its own latency (seconds)."""
        self.cumulative.setdefault(hop, MicrosecondCounts()).add(latency_s)
        self.own.setdefault(hop, MicrosecondCounts()).add(own_s)
        if self.series is not None:
            self.series.add(hop, own_s)
        if self.for_master:
            self._new_cum.setdefault(hop, []).append(latency_s)
            self._new_own.setdefault(hop, []).append(own_s)

    def add_send_lag(self, lag_s: float) -> None:
        self.lag.add(lag_s)
        b = max(0, int(round(lag_s / LAG_RESOLUTION_S)))
        self._new_lag[b] = self._new_lag.get(b, 0) + 1

    def set_totals(self, source: str, totals: Totals) -> None:
        self.totals[source] = totals

    def take_report(self, totals: Totals) -> dict[str, Any]:
        """What a worker sends its master: values since the last report, and its totals."""
        out = {
            "cumulative": self._new_cum,
            "own": self._new_own,
            "lag": {str(k): v for k, v in self._new_lag.items()},
            "totals": totals.as_dict(),
        }
        self._new_cum, self._new_own, self._new_lag = {}, {}, {}
        return out

    # -- the master -----------------------------------------------------------------------------

    def merge_report(self, source: str, report: Mapping[str, Any]) -> None:
        """Add a worker's report (from :meth:`take_report`)."""
        for hop, values in dict(report.get("cumulative", {})).items():
            self.cumulative.setdefault(str(hop), MicrosecondCounts()).extend(values)
        for hop, values in dict(report.get("own", {})).items():
            self.own.setdefault(str(hop), MicrosecondCounts()).extend(values)
            if self.series is not None:
                self.series.extend(str(hop), values)
        self.lag.merge(dict(report.get("lag", {})))
        if "totals" in report:
            self.totals[source] = Totals.from_dict(report["totals"])

    # -- views ----------------------------------------------------------------------------------

    def summed(self) -> Totals:
        """Totals summed over every source."""
        out = Totals()
        for t in self.totals.values():
            for hop, c in t.markers.items():
                acc = out.markers.setdefault(hop, dict.fromkeys(_COUNTS, 0))
                for k in _COUNTS:
                    acc[k] += c.get(k, 0)
            for k, v in t.sessions.items():
                out.sessions[k] = out.sessions.get(k, 0) + v
        return out

    def hops(self) -> list[str]:
        """Hops in pipeline order: declared first, then by median cumulative latency, the
        return direction last."""
        known = set(self.cumulative) | set(self.summed().markers)
        declared = [h for h in self.hop_order if h in known]

        def rank(h: str) -> tuple[int, float, str]:
            if h == RETURN_HOP:
                return (1, 0.0, h)
            q = self.cumulative[h].quantile(0.5) if h in self.cumulative else None
            return (0, math.inf if q is None else q, h)

        rest = sorted((h for h in known if h not in declared), key=rank)
        return declared + rest

    def rows(self) -> list[dict[str, Any]]:
        """The Hops table: a warning row while any process is overloaded (or markers went
        unmeasured), a row per hop, then send lag and sessions."""
        totals = self.summed()
        rows: list[dict[str, Any]] = []
        warning = overload_note(totals)
        if warning:
            warn: dict[str, Any] = {k: "" for k, _ in COLUMNS}
            warn.update(name="WARNING", note=warning)
            rows.append(warn)
        for hop in self.hops():
            row: dict[str, Any] = {"name": hop}
            counts = totals.markers.get(hop, {})
            for k in _COUNTS:
                row[k] = counts.get(k, 0)
            cum = self.cumulative[hop].summary_ms() if hop in self.cumulative else {}
            own = self.own[hop].summary_ms() if hop in self.own else {}
            for k in _PCTS:
                row[k] = _cell(cum.get(k))
                row["own" + k] = _cell(own.get(k))
            row["note"] = f"{cum.get('count', 0)} latencies"
            rows.append(row)
        lag = self.lag.summary_ms()
        lag_row: dict[str, Any] = {k: "" for k, _ in COLUMNS}
        lag_row["name"] = "send lag"
        for k in _PCTS:
            lag_row[k] = _cell(lag.get(k))
        lag_row["note"] = f"{lag['count']} frames, 10 us resolution"
        rows.append(lag_row)
        s = totals.sessions
        ses_row: dict[str, Any] = {k: "" for k, _ in COLUMNS}
        ses_row["name"] = "sessions"
        ses_row["note"] = ", ".join(f"{k.replace('_', ' ')} {s.get(k, 0)}" for k in _SESSION_KEYS)
        rows.append(ses_row)
        return rows

    def csv(self, rows: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The Hops table (``rows``, by default :meth:`rows`) as CSV (the web UI's download)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([title for _, title in COLUMNS])
        for row in self.rows() if rows is None else rows:
            w.writerow([row.get(k, "") for k, _ in COLUMNS])
        return buf.getvalue()


def overload_note(totals: Totals) -> str | None:
    """The Hops tab's warning when the probe itself is (or was) overloaded, else None."""
    now = totals.sessions.get("overloaded", 0)
    unmeasured = sum(c.get("unmeasured", 0) for c in totals.markers.values())
    if not now and not unmeasured:
        return None
    state = (
        f"the probe is overloaded now on {now} process(es)"
        if now
        else "the probe was overloaded earlier in this run"
    )
    return (
        f"{state}: its latencies measure the probe, not the target; {unmeasured} markers owed "
        "meanwhile are unmeasured, not missed (add workers or lower the load)"
    )


def _cell(v: object) -> float | str:
    return "" if v is None else float(v) if isinstance(v, (int, float)) else str(v)
