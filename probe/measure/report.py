"""The run report (schema ``probe.report/v1``): build it from a registry, write, load and print it.

Latencies in the report are milliseconds rounded to 0.001; send times in ``series`` are the
registry's clock in seconds, as recorded. Markers still pending when the report is built appear in
the counts but not in ``series``: call ``registry.settle_all()`` first at the end of a run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, overload

import numpy as np
import numpy.typing as npt

from probe.errors import ConfigError
from probe.measure.latency import hop_order_by_median
from probe.measure.registry import SeriesRecords, SessionRegistry
from probe.measure.stats import summarize_ms

__all__ = [
    "DEFAULT_CLOCKS",
    "SCHEMA",
    "SeriesRows",
    "build_report",
    "format_table",
    "interrupted_note",
    "json_ready",
    "load_report",
    "overload_warning",
    "write_report",
]

SCHEMA = "probe.report/v1"
DEFAULT_CLOCKS = "one clock on one host for send and arrival times"

_TOP_KEYS = ("schema", "target", "started_at", "duration_s", "clocks", "sessions", "hops", "series")
_MARKER_KEYS = ("sent", "detected", "missed", "unmeasured", "duplicates", "unmatched", "late")


_OUTCOMES = ("detected", "missed", "unmeasured")
# Rows turned into dicts at a time when the series is read through.
_ROWS_AT_ONCE = 8192

F64 = npt.NDArray[np.float64]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class SeriesRows(Sequence[dict[str, Any]]):
    """The report's ``series`` as :func:`build_report` makes it: a read-only sequence of the row
    dicts docs/report.md describes (``hop``, ``session``, ``marker``, ``send_time``,
    ``latency_ms``, ``outcome``), in report order (send time, session, marker, hop order), each
    made when it is read from the registry's spooled records (:mod:`probe.measure.spool`), so a
    long run's report never holds a Python object per row. It compares equal to a list of the
    same rows; ``list(rows)`` gives that list. :func:`write_report` streams it."""

    __slots__ = ("_order", "_rec")

    def __init__(self, rec: SeriesRecords, hop_order: Sequence[str]) -> None:
        self._rec = rec
        r = rec.records
        rank = {hop: i for i, hop in enumerate(hop_order)}
        hop_rank = np.array([rank.get(h, len(rank)) for h in rec.hops], dtype=np.int64)
        names = {name: i for i, name in enumerate(sorted(set(rec.sessions)))}
        session_rank = np.array([names[n] for n in rec.sessions], dtype=np.int64)
        # lexsort is stable and sorts by its last key first: ties keep the settlement order.
        self._order: npt.NDArray[np.intp] = np.lexsort(
            (hop_rank[r["hop"]], r["seq"], session_rank[r["session"]], r["send"])
        )

    def __len__(self) -> int:
        return len(self._order)

    def _rows(self, at: npt.NDArray[np.intp]) -> list[dict[str, Any]]:
        hops, sessions = self._rec.hops, self._rec.sessions
        return [
            {
                "hop": hops[hop],
                "session": sessions[session],
                "marker": seq,
                "send_time": send,
                "latency_ms": _ms(latency) if outcome == 0 else None,
                "outcome": _OUTCOMES[outcome],
            }
            for hop, outcome, session, seq, send, _arrival, latency, _score in (
                self._rec.records[at].tolist()
            )
        ]

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return self._rows(self._order[i])
        n = len(self._order)
        if not -n <= i < n:
            raise IndexError("series row out of range")
        return self._rows(self._order[i : i + 1 if i != -1 else None])[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self._order), _ROWS_AT_ONCE):
            yield from self._rows(self._order[start : start + _ROWS_AT_ONCE])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SeriesRows | list | tuple):
            return len(self) == len(other) and all(
                a == b for a, b in zip(self, other, strict=True)
            )
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<SeriesRows: {len(self)} rows>"


def _own_latencies(
    rec: SeriesRecords, detected: npt.NDArray[np.bool_], order: Sequence[str]
) -> dict[str, F64]:
    """Each hop's own latencies (seconds), by :func:`probe.measure.latency.own_latencies`'s rule,
    computed over the records: sorted by marker and hop rank, each detection minus the one before
    it of the same marker."""
    r = rec.records
    rank = {hop: i for i, hop in enumerate(order)}
    hop_rank = np.array([rank.get(h, -1) for h in rec.hops], dtype=np.int64)[r["hop"]]
    keep = detected & (hop_rank >= 0)
    session, seq, ranks = r["session"][keep], r["seq"][keep], hop_rank[keep]
    latency = np.asarray(r["latency"][keep], dtype=np.float64)
    at = np.lexsort((ranks, seq, session))
    session, seq, ranks, latency = session[at], seq[at], ranks[at], latency[at]
    own = latency.copy()
    same = (session[1:] == session[:-1]) & (seq[1:] == seq[:-1])
    own[1:][same] -= latency[:-1][same]
    return {hop: own[ranks == i] for i, hop in enumerate(order)}


def build_report(
    registry: SessionRegistry,
    *,
    target: str,
    started_at: float,
    duration_s: float,
    hop_order: Sequence[str] | None = None,
    reply: Sequence[float] = (),
    reply_missed: int | None = None,
    configured: Mapping[str, float] | None = None,
    clocks: str = DEFAULT_CLOCKS,
    interrupted: Mapping[str, Any] | None = None,
    invalid: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a run as a dict, JSON-ready except ``series``: a :class:`SeriesRows`, read
    from the registry's spool as it is used (:func:`write_report` streams it; :func:`json_ready`
    makes it a list, for a small report).

    ``started_at`` is epoch seconds; ``reply`` are voice-to-voice latencies in seconds (and
    ``reply_missed`` the utterances that got none); ``configured`` is each hop's configured delay
    in seconds, where known (a reference pipeline), shown beside the measured one.
    ``interrupted`` says how a run cut short by a signal ended (``signal``, ``after_s``,
    ``unmeasured``: markers still pending then, settled as unmeasured); None for a whole run.
    ``invalid`` says why the probe itself failed during the run (``reason``, ``after_s``): its
    figures from then on measure nothing; None when it did not.
    """
    rec = registry.series_records()
    r = rec.records
    counts = registry.hop_counts()
    detected = r["outcome"] == 0
    hop_col = r["hop"]
    latency = r["latency"]
    cumulative_of = {
        hop: latency[detected & (hop_col == i)] for i, hop in enumerate(rec.hops)
    }
    medians = {hop: float(np.median(v)) for hop, v in cumulative_of.items() if len(v)}
    order = hop_order_by_median(medians, hop_order, known=counts)
    empty = np.empty(0, dtype=np.float64)
    cumulative = {hop: cumulative_of.get(hop, empty) for hop in order}
    own = _own_latencies(rec, detected, order)
    hop_errors = registry.hop_errors()
    hops: list[dict[str, Any]] = []
    for hop in order:
        c = counts.get(hop)
        entry: dict[str, Any] = {
            "name": hop,
            "markers": {key: (getattr(c, key) if c is not None else 0) for key in _MARKER_KEYS},
            "latency_ms": summarize_ms(cumulative[hop]),
            "own_latency_ms": summarize_ms(own[hop]),
            "errors": [e.as_dict() for e in hop_errors.get(hop, [])],
        }
        if configured is not None and hop in configured:
            entry["configured_ms"] = _ms(configured[hop])
        hops.append(entry)
    sc = registry.session_counts()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "target": target,
        "started_at": datetime.fromtimestamp(started_at, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "duration_s": round(float(duration_s), 3),
        "interrupted": dict(interrupted) if interrupted is not None else None,
        "invalid": dict(invalid) if invalid is not None else None,
        "clocks": clocks,
        "sessions": {
            "started": sc.started,
            "completed": sc.completed,
            "failed": sc.failed,
            "open": sc.open,
            "errors": [e.as_dict() for e in sc.errors],
        },
        "hops": hops,
        "rejected_forks": registry.rejected_forks(),
        "send_lag_ms": registry.send_lag().summary_ms(),
    }
    generator = registry.generator()
    if generator is not None:
        report["generator"] = generator
    if not reply and reply_missed is None:
        reply, reply_missed = registry.replies()
        if not reply and not reply_missed:
            reply_missed = None
    if reply or reply_missed:
        report["reply_ms"] = summarize_ms(reply)
        if reply_missed is not None:
            report["reply_missed"] = reply_missed
    conversation = registry.conversation_report()
    if conversation is not None:
        report["conversation"] = conversation
    report["series"] = SeriesRows(rec, order)
    return report


def json_ready(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with a lazy ``series`` made a list: a dict ``json.dumps`` takes. The list holds
    a dict per row: for small reports and tests (:func:`write_report` needs no such copy)."""
    out = dict(report)
    if "series" in out and not isinstance(out["series"], list):
        out["series"] = list(out["series"])
    return out


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report as JSON, atomically (a temporary file beside it, then a rename). A
    ``series`` that is not a list (:class:`SeriesRows`) is streamed a row at a time: the file is
    the same as for the list of its rows."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _dump(report, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump(report: Mapping[str, Any], f: IO[str]) -> None:
    """``json.dump(report, f, indent=2, allow_nan=False)``, with ``series`` streamed."""
    series = report.get("series")
    if isinstance(series, list) or series is None:
        json.dump(report, f, indent=2, allow_nan=False)
        return
    head = json.dumps(
        {k: v for k, v in report.items() if k != "series"}, indent=2, allow_nan=False
    )
    f.write(head[:-2] + ',\n  "series": ' if len(head) > 2 else '{\n  "series": ')
    first = True
    for row in series:
        f.write("[\n    " if first else ",\n    ")
        f.write(json.dumps(row, indent=2, allow_nan=False).replace("\n", "\n    "))
        first = False
    f.write("[]\n}" if first else "\n  ]\n}")


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report written by :func:`write_report`; ConfigError if it is not one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"Cannot read report {os.fspath(path)!r}: {e.strerror or e}.") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"Report {os.fspath(path)!r} is not valid JSON: {e}.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Report {os.fspath(path)!r} is not a JSON object.")
    if data.get("schema") != SCHEMA:
        raise ConfigError(
            f"Report {os.fspath(path)!r} has schema {data.get('schema')!r}; expected {SCHEMA!r}."
        )
    missing = [k for k in _TOP_KEYS if k not in data]
    if missing:
        raise ConfigError(f"Report {os.fspath(path)!r} lacks {', '.join(missing)}.")
    hops = data["hops"]
    if not isinstance(hops, list) or not all(
        isinstance(h, dict) and {"name", "markers", "latency_ms", "own_latency_ms"} <= h.keys()
        for h in hops
    ):
        raise ConfigError(f"Report {os.fspath(path)!r} has a malformed 'hops' list.")
    if not isinstance(data["series"], list):
        raise ConfigError(f"Report {os.fspath(path)!r} has a malformed 'series' list.")
    return data


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def _line(name: str, summary: Mapping[str, Any]) -> str:
    if not summary.get("count"):
        return f"{name}: none"
    parts = ", ".join(f"{k} {_fmt(summary[k])}" for k in ("p50", "p95", "p99", "max"))
    return f"{name} (ms): {parts} (n={summary['count']})"


def _conversation_lines(conv: Mapping[str, Any] | None) -> list[str]:
    """The ``conversation`` section in a few lines: only what the run measured."""
    if not conv:
        return []
    lines: list[str] = []
    for kind, r in (conv.get("results") or {}).items():
        if kind in ("interim", "final") and r.get("count"):
            line = _line(f"{kind} results", r["latency_ms"])
            if r.get("without_offsets"):
                line += f", {r['without_offsets']} of {r['count']} without offsets (not timed)"
            lines.append(line)
    bad = conv.get("malformed_results") or {}
    if bad:
        why = ", ".join(f"{reason}: {n}" for reason, n in bad.items())
        lines.append(f"malformed results: {sum(bad.values())} ({why})")
    for name, label in (
        ("first_interim", "first interim"),
        ("final_delay", "final delay"),
        ("barge_in", "barge-in"),
        ("clear", "clear"),
        ("mark", "bot marks played"),
    ):
        f = conv.get(name) or {}
        attempts = int(f.get("attempts") or 0)
        if not (f.get("latency_ms") or {}).get("count") and not f.get("missed") and not attempts:
            continue
        line = _line(label, f.get("latency_ms") or {})
        if name == "barge_in":
            line += f", {attempts} barge-ins, {f.get('talked_over', 0)} talked over"
        if f.get("missed"):
            why = "; ".join(f"{w}: {n}" for w, n in (f.get("missed_why") or {}).items())
            line += f", {f['missed']} missed" + (f" ({why})" if why else "")
        lines.append(line)
    wer = conv.get("wer") or {}
    if wer.get("rate") is not None:
        errors = "word error" + ("" if wer["errors"] == 1 else "s")
        lines.append(
            f"WER {100.0 * wer['rate']:.1f}% ({wer['errors']} {errors} in {wer['words']} "
            "script words)"
        )
    return lines


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table for people: per hop, cumulative and own latency (ms), marker counts and
    the configured delay where known; then sessions, send lag, replies and conversation timing."""
    head = (
        "hop",
        "p50",
        "p95",
        "p99",
        "max",
        "own p50",
        "own p95",
        "own p99",
        "own max",
        "sent",
        "det",
        "miss",
        "conf",
    )
    rows: list[tuple[str, ...]] = [head]
    for h in report["hops"]:
        cum, own, mk = h["latency_ms"], h["own_latency_ms"], h["markers"]
        rows.append(
            (
                str(h["name"]),
                *(_fmt(cum[k]) for k in ("p50", "p95", "p99", "max")),
                *(_fmt(own[k]) for k in ("p50", "p95", "p99", "max")),
                str(mk["sent"]),
                str(mk["detected"]),
                str(mk["missed"]),
                _fmt(h.get("configured_ms")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not report["hops"]:
        # Nothing came back to find markers in (a text or voice reply, --no-sink).
        lines = ["no hop reported markers"]
    s = report["sessions"]
    lines.append("")
    lines.append(
        f"sessions: {s['started']} started, {s['completed']} completed, {s['failed']} failed"
    )
    for e in s["errors"][:5]:
        lines.append(f"  {e['session']}: {e['error']}")
    if len(s["errors"]) > 5:
        lines.append(f"  ... and {len(s['errors']) - 5} more")
    lines.append(_line("send lag", report.get("send_lag_ms", {})))
    refused = report.get("rejected_forks") or {}
    if refused:
        why = ", ".join(f"{reason}: {n}" for reason, n in sorted(refused.items()))
        lines.append(f"forks refused by the sink: {sum(refused.values())} ({why})")
    if "reply_ms" in report:
        line = _line("reply", report["reply_ms"])
        if "reply_missed" in report:
            line += f", {report['reply_missed']} missed"
        lines.append(line)
    lines.extend(_conversation_lines(report.get("conversation")))
    warning = overload_warning(report)
    if warning:
        lines[:0] = [warning, ""]
    cut = interrupted_note(report)
    if cut:
        lines[:0] = [cut, ""]
    bad = report.get("invalid")
    if bad:
        lines[:0] = [f"INVALID after {float(bad['after_s']):.1f} s: {bad['reason']}.", ""]
    return "\n".join(lines)


def interrupted_note(report: Mapping[str, Any]) -> str | None:
    """One sentence when the run was cut short by a signal, else None."""
    cut = report.get("interrupted")
    if not cut:
        return None
    still = int(report.get("sessions", {}).get("open", 0))
    return (
        f"INTERRUPTED by {cut['signal']} after {float(cut['after_s']):.1f} s: a partial report "
        f"(sessions still open: {still}; {cut['unmeasured']} markers still pending, counted per "
        "hop, are unmeasured, not missed)."
    )


def overload_warning(report: Mapping[str, Any]) -> str | None:
    """One sentence when the generator was overloaded during the run, else None."""
    gen = report.get("generator") or {}
    if not gen.get("overloaded"):
        return None
    why = sorted(
        {e["signal"] for p in gen.get("periods", []) for e in p.get("evidence", [])}
    )
    unmeasured = sum(int(h["markers"].get("unmeasured", 0)) for h in report.get("hops", []))
    return (
        f"WARNING: the probe itself was overloaded ({', '.join(why) or 'no detail'} past its "
        f"bounds): its latencies measure the probe, not the target, and {unmeasured} markers "
        "owed meanwhile are counted unmeasured, not missed."
    )
