"""Canary thresholds: parse ``[hop=NAME ]METRIC OP VALUE[UNIT]`` and judge a report by them.

Sans-I/O: text in, :class:`Threshold` out; a ``probe.report/v1`` dict in, a :class:`Verdict` out.

Grammar (spaces around the operator are optional)::

    threshold := [ "hop=" NAME " " ] METRIC OP VALUE [UNIT]
    METRIC    := STAT                     cumulative latency (ms|s)
               | "own." STAT              a hop's own latency (ms|s); needs hop=
               | "send_lag " STAT         frame send lag of the source (ms|s)
               | "reply " STAT            voice-to-voice reply latency (ms|s)
               | "result " STAT           text results' latency, interim and final (ms|s)
               | "result.interim " STAT   interim results' latency (ms|s)
               | "result.final " STAT     final results' latency (ms|s)
               | "first_interim " STAT    an utterance's speech start -> its first interim
               | "final " STAT            an utterance's speech end -> its final (ms|s);
                                          "final_delay " STAT is the same
               | "barge_in " STAT         barge-in start -> the bot's audio silent (ms|s)
               | "clear " STAT            barge-in start -> the bot's Twilio clear (ms|s)
               | "wer"                    the run's word error rate: % or a fraction of 1
               | "markers"                detected / sent, in %, over all hops or hop=NAME
               | "sessions"               completed / started, in %
    STAT      := p50 | p90 | p95 | p99 | p999 | max | mean
    OP        := < | <= | > | >=
    UNIT      := ms | s | %

Every word of a metric may be joined to the next by a space or a dot (``reply p99``,
``reply.p99``, ``result.final p99``). A latency without ``hop=`` is end to end: the last hop of
the report (pipeline order, ``return`` last). The conversation metrics (result .. wer) read the
report's ``conversation`` section; ``result`` pools interim and final results, and where the
report has only their separate summaries a percentile is judged by the one of the two that
makes the check harder (the pooled one lies between them; mean and max are exact). A threshold
that cannot be evaluated (a hop never seen, no samples, no markers sent, no replies or
conversation figures measured, no words scored) is a breach with a message that says why, never
a pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from probe.errors import ConfigError

__all__ = [
    "STATS",
    "Check",
    "Threshold",
    "Verdict",
    "format_verdict",
    "judge",
    "parse_threshold",
    "parse_thresholds",
]

STATS = ("p50", "p90", "p95", "p99", "p999", "max", "mean")
_OPS = ("<=", ">=", "<", ">")
_HOP_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RE = re.compile(
    r"""^\s*
    (?:hop=(?P<hop>\S*)\s+)?
    (?P<metric>[A-Za-z_][A-Za-z0-9_]*(?:[ .]+[A-Za-z0-9_]+){0,2})
    \s*(?P<op><=|>=|<|>|==|=)\s*
    (?P<value>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)
    \s*(?P<unit>[A-Za-z%]*)\s*$""",
    re.VERBOSE,
)
_GRAMMAR = "[hop=NAME ]METRIC OP VALUE[UNIT], e.g. 'hop=model p95<250ms' or 'markers>=99.9%'"

# The implicit check a canary makes when no ``sessions`` threshold is given: the target is up.
IMPLICIT_SESSIONS = "sessions>=100%"

# Conversation latency metrics: the first word(s) -> Threshold.kind.
_CONVERSATION = {
    ("result",): "result",
    ("result", "interim"): "result.interim",
    ("result", "final"): "result.final",
    ("first_interim",): "first_interim",
    ("final",): "final_delay",
    ("final_delay",): "final_delay",
    ("barge_in",): "barge_in",
    ("clear",): "clear",
}
_CONVERSATION_KINDS = frozenset(_CONVERSATION.values())
_FIGURE_WHAT = {
    "first_interim": "time to first interim",
    "final_delay": "final delay",
    "barge_in": "barge-in latency",
    "clear": "barge-in clear",
}


@dataclass(frozen=True)
class Threshold:
    """One parsed threshold. ``kind`` is latency, own, send_lag, reply, markers, sessions, wer
    or a conversation latency (result, result.interim, result.final, first_interim,
    final_delay, barge_in, clear); ``stat`` the statistic for the latency kinds; ``limit`` is
    in ms for latencies, % otherwise."""

    text: str
    kind: str
    stat: str | None
    op: str
    limit: float
    hop: str | None = None

    def holds(self, value: float) -> bool:
        return {
            "<": value < self.limit,
            "<=": value <= self.limit,
            ">": value > self.limit,
            ">=": value >= self.limit,
        }[self.op]


def parse_threshold(text: str) -> Threshold:
    """Parse one threshold; :class:`ConfigError` with one sentence naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"A threshold is empty; write {_GRAMMAR}.")
    shown = text.strip()
    m = _RE.match(text)
    if m is None:
        raise ConfigError(f"Threshold {shown!r} is not of the form {_GRAMMAR}.")
    hop, metric, op, value, unit = m.group("hop", "metric", "op", "value", "unit")
    if op in ("=", "=="):
        raise ConfigError(f"Threshold {shown!r}: the operator must be <, <=, > or >=, not {op!r}.")
    if hop is not None and not _HOP_RE.fullmatch(hop):
        raise ConfigError(
            f"Threshold {shown!r}: hop name {hop!r} must be 1-64 characters of A-Z a-z 0-9 . _ -."
        )
    words = re.split(r"[ .]+", metric.strip())
    kind: str
    stat: str | None
    if len(words) == 1 and words[0] in STATS:
        kind, stat = "latency", words[0]
    elif len(words) == 1 and words[0] in ("markers", "sessions", "wer"):
        kind, stat = words[0], None
    elif len(words) == 2 and words[0] in ("own", "send_lag", "reply"):
        kind, stat = words[0], words[1]
    elif len(words) >= 2 and tuple(words[:-1]) in _CONVERSATION:
        kind, stat = _CONVERSATION[tuple(words[:-1])], words[-1]
    else:
        raise ConfigError(
            f"Threshold {shown!r}: unknown metric {metric.strip()!r}; use p50|p90|p95|p99|p999|"
            "max|mean, own.p95, markers, sessions, 'send_lag p99', 'reply p99', 'result p95', "
            "'result.interim p95', 'result.final p99', 'first_interim p95', 'final p99', "
            "'barge_in p95', 'clear p95' or wer."
        )
    if stat is not None and stat not in STATS:
        raise ConfigError(
            f"Threshold {shown!r}: unknown statistic {stat!r} for {kind}; "
            f"use one of {', '.join(STATS)}."
        )
    if kind == "own" and hop is None:
        raise ConfigError(
            f"Threshold {shown!r}: own latency needs a hop, as in 'hop=NAME {metric}'."
        )
    if (
        kind in ("sessions", "send_lag", "reply", "wer") or kind in _CONVERSATION_KINDS
    ) and hop is not None:
        raise ConfigError(f"Threshold {shown!r}: hop= does not apply to {kind}.")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"Threshold {shown!r}: the value must be a finite number of 0 or more.")
    if kind == "wer":
        if unit not in ("%", ""):
            raise ConfigError(
                f"Threshold {shown!r}: wer is a rate; write it as a percentage or a fraction "
                f"of 1, as in 'wer<15%' or 'wer<0.15', not with {unit!r}."
            )
        if unit == "" and number > 1:
            raise ConfigError(
                f"Threshold {shown!r}: a wer without % is a fraction of 1 (0.15 for 15%); "
                f"write '{number:g}%' for a percentage."
            )
        limit = number if unit == "%" else number * 100.0
    elif kind in ("markers", "sessions"):
        if unit != "%":
            raise ConfigError(
                f"Threshold {shown!r}: {kind} is a percentage; write the value with %, "
                f"as in '{kind}>=99.9%'."
            )
        if number > 100:
            raise ConfigError(f"Threshold {shown!r}: a percentage cannot exceed 100.")
        limit = number
    else:
        if unit not in ("ms", "s"):
            raise ConfigError(
                f"Threshold {shown!r}: a latency needs a unit, ms or s"
                + (f", not {unit!r}" if unit else "")
                + f", as in '{metric.strip()}<250ms'."
            )
        limit = number * (1000.0 if unit == "s" else 1.0)
    return Threshold(text=shown, kind=kind, stat=stat, op=op, limit=limit, hop=hop)


def parse_thresholds(texts: Iterable[str]) -> list[Threshold]:
    return [parse_threshold(t) for t in texts]


@dataclass(frozen=True)
class Check:
    """A threshold judged: the measured ``value`` (ms or %; None when it could not be measured),
    whether it holds, and a one-line ``detail`` for people."""

    threshold: str
    ok: bool
    value: float | None
    unit: str
    detail: str
    implicit: bool = False


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def breaches(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _hop(report: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    for h in report.get("hops", []):
        if h.get("name") == name:
            return h  # type: ignore[no-any-return]
    return None


def _seen(report: Mapping[str, Any]) -> str:
    names = [str(h.get("name")) for h in report.get("hops", [])]
    return ", ".join(names) if names else "none"


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f} ms" if unit == "ms" else f"{value:.3g}%"


def _measure(t: Threshold, report: Mapping[str, Any]) -> tuple[float | None, str, str]:
    """(value, unit, why-not) for one threshold; value None means it could not be measured."""
    if t.kind == "sessions":
        s = report.get("sessions", {})
        started = int(s.get("started", 0))
        if started == 0:
            return None, "%", "no session was started"
        value = 100.0 * int(s.get("completed", 0)) / started
        errors = s.get("errors") or []
        why = f"{s.get('completed', 0)} of {started} sessions completed"
        if errors and value < 100.0:
            why += f"; first error: {errors[0].get('error')}"
        return value, "%", why
    if t.kind == "markers":
        hops = report.get("hops", [])
        if t.hop is not None:
            h = _hop(report, t.hop)
            if h is None:
                return None, "%", f"hop {t.hop!r} was never seen (hops seen: {_seen(report)})"
            hops = [h]
        sent = sum(int(h["markers"]["sent"]) for h in hops)
        detected = sum(int(h["markers"]["detected"]) for h in hops)
        if sent == 0:
            where = f"to hop {t.hop!r}" if t.hop else "to any hop"
            return None, "%", f"no markers were sent {where}"
        return 100.0 * detected / sent, "%", f"{detected} of {sent} markers detected"
    if t.kind == "wer" or t.kind in _CONVERSATION_KINDS:
        return _measure_conversation(t, report)
    assert t.stat is not None
    summary: Mapping[str, Any] | None
    what: str
    if t.kind == "send_lag":
        summary, what = report.get("send_lag_ms"), "send lag"
    elif t.kind == "reply":
        summary, what = report.get("reply_ms"), "reply latency"
        if summary is None:
            return None, "ms", "no reply latency was measured in this run"
    else:
        if t.hop is None:
            hops = report.get("hops", [])
            if not hops:
                return None, "ms", "no hop was seen, so there is no end-to-end latency"
            h = hops[-1]
        else:
            found = _hop(report, t.hop)
            if found is None:
                return None, "ms", f"hop {t.hop!r} was never seen (hops seen: {_seen(report)})"
            h = found
        key = "own_latency_ms" if t.kind == "own" else "latency_ms"
        summary = h.get(key)
        what = f"hop {h.get('name')!r}" + (" own latency" if t.kind == "own" else "")
    if not summary or not summary.get("count") or summary.get(t.stat) is None:
        return None, "ms", f"{what} has no samples"
    n = int(summary["count"])
    return float(summary[t.stat]), "ms", f"{what} {t.stat} over {n} samples"


def _measure_conversation(
    t: Threshold, report: Mapping[str, Any]
) -> tuple[float | None, str, str]:
    """(value, unit, why-not) for a conversation threshold, from ``report["conversation"]``."""
    unit = "%" if t.kind == "wer" else "ms"
    conv = report.get("conversation")
    if not conv:
        return None, unit, "no conversation timing was measured in this run"
    if t.kind == "wer":
        wer = conv.get("wer") or {}
        if wer.get("rate") is None:
            return None, "%", "no final text was scored against a fixture's script"
        n = len(wer.get("sessions") or [])
        where = f" over {n} session{'s' if n != 1 else ''}" if n else ""
        why = f"{wer.get('errors', 0)} word errors in {wer.get('words', 0)} script words{where}"
        return 100.0 * float(wer["rate"]), "%", why
    assert t.stat is not None
    if t.kind.startswith("result"):
        return _measure_results(t, conv.get("results") or {})
    entry = conv.get(t.kind) or {}
    summary = entry.get("latency_ms") or {}
    what = _FIGURE_WHAT[t.kind]
    missed = int(entry.get("missed") or 0)
    missed_note = ""
    if missed:
        reasons = "; ".join(f"{why}: {n}" for why, n in (entry.get("missed_why") or {}).items())
        missed_note = f", {missed} missed" + (f" ({reasons})" if reasons else "")
    if not summary.get("count") or summary.get(t.stat) is None:
        return None, "ms", f"{what} has no samples{missed_note}"
    n = int(summary["count"])
    return float(summary[t.stat]), "ms", f"{what} {t.stat} over {n} samples{missed_note}"


def _measure_results(
    t: Threshold, results: Mapping[str, Any]
) -> tuple[float | None, str, str]:
    assert t.stat is not None
    kinds = [t.kind.split(".", 1)[1]] if "." in t.kind else ["interim", "final"]
    what = f"{kinds[0]} results' latency" if len(kinds) == 1 else "results' latency"
    unplaced = sum(int((results.get(k) or {}).get("without_offsets") or 0) for k in kinds)
    plural = "s" if unplaced != 1 else ""
    note = f", {unplaced} result{plural} without offsets not timed" if unplaced else ""
    pooled = (results.get("all") or {}).get("latency_ms") if len(kinds) == 2 else None
    summaries: list[Mapping[str, Any]] = (
        [pooled] if pooled else [(results.get(k) or {}).get("latency_ms") or {} for k in kinds]
    )
    have = [s for s in summaries if s.get("count") and s.get(t.stat) is not None]
    if not have:
        return None, "ms", f"{what} has no samples{note}"
    n = sum(int(s["count"]) for s in have)
    values = [float(s[t.stat]) for s in have]
    if len(have) == 1:
        return values[0], "ms", f"{what} {t.stat} over {n} samples{note}"
    if t.stat == "mean":
        value = sum(float(s["mean"]) * int(s["count"]) for s in have) / n
        return value, "ms", f"{what} mean over {n} samples{note}"
    if t.stat == "max":
        return max(values), "ms", f"{what} max over {n} samples{note}"
    # Only the kinds' own percentiles are known; the pooled one lies between them.
    harder = max(values) if t.op in ("<", "<=") else min(values)
    bound = "the larger" if t.op in ("<", "<=") else "the smaller"
    return harder, "ms", (
        f"{what} {t.stat} over {n} samples, {bound} of interim's and final's{note}"
    )


def judge(
    report: Mapping[str, Any], thresholds: Sequence[Threshold], *, implicit: bool = True
) -> Verdict:
    """Judge ``report`` by ``thresholds``. With ``implicit`` (the canary's way), a run whose
    sessions did not all complete is a breach unless a ``sessions`` threshold says otherwise:
    a target that is down fails the canary."""
    todo = [(t, False) for t in thresholds]
    if implicit and not any(t.kind == "sessions" for t in thresholds):
        todo.insert(0, (parse_threshold(IMPLICIT_SESSIONS), True))
    checks: list[Check] = []
    for t, is_implicit in todo:
        value, unit, why = _measure(t, report)
        if value is None:
            checks.append(Check(t.text, False, None, unit, f"cannot judge: {why}", is_implicit))
            continue
        ok = t.holds(value)
        limit = _fmt(t.limit, unit)
        detail = f"{_fmt(value, unit)} {'holds' if ok else 'breaches'} {t.op} {limit} ({why})"
        checks.append(Check(t.text, ok, value, unit, detail, is_implicit))
    return Verdict(tuple(checks))


def format_verdict(report: Mapping[str, Any], verdict: Verdict) -> str:
    """The canary's compact table: per hop p50/p95/p99 and markers, then one line per check."""
    rows: list[tuple[str, ...]] = [("hop", "p50", "p95", "p99", "markers")]
    for h in report.get("hops", []):
        lat, mk = h["latency_ms"], h["markers"]
        rows.append(
            (
                str(h["name"]),
                *("-" if lat.get(k) is None else f"{lat[k]:.1f}" for k in ("p50", "p95", "p99")),
                f"{mk['detected']}/{mk['sent']}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    if len(rows) == 1:
        lines.append("(no hop was seen)")
    s = report.get("sessions", {})
    lines.append(
        f"sessions {s.get('completed', 0)}/{s.get('started', 0)} completed, "
        f"{report.get('duration_s', 0):.1f} s"
    )
    for c in verdict.checks:
        tag = "ok  " if c.ok else "FAIL"
        lines.append(f"{tag} {c.threshold}{' (implicit)' if c.implicit else ''}: {c.detail}")
    lines.append(
        "canary: " + ("PASS" if verdict.ok else f"FAIL ({len(verdict.breaches)} breached)")
    )
    return "\n".join(lines)
