"""Threshold grammar and the judge, on hand-made probe.report/v1 dicts (no network)."""

from __future__ import annotations

from typing import Any

import pytest

from probe.canary.thresholds import (
    format_verdict,
    judge,
    parse_threshold,
    parse_thresholds,
)
from probe.errors import ConfigError
from probe.measure.conversation import ConversationLog, Figure, ResultTiming, WordErrors


def _summary(p50: float, p95: float, p99: float, count: int = 10) -> dict[str, Any]:
    return {
        "p50": p50, "p90": p95, "p95": p95, "p99": p99, "p999": p99, "max": p99, "mean": p50,
        "count": count,
    }


_EMPTY = {"p50": None, "p90": None, "p95": None, "p99": None, "p999": None, "max": None,
          "mean": None, "count": 0}


def _hop(
    name: str, cum: dict[str, Any], own: dict[str, Any], sent: int, det: int
) -> dict[str, Any]:
    return {
        "name": name,
        "markers": {"sent": sent, "detected": det, "missed": sent - det, "duplicates": 0,
                    "unmatched": 0, "late": 0},
        "latency_ms": cum,
        "own_latency_ms": own,
        "errors": [],
    }


def _report(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "schema": "probe.report/v1",
        "target": "ws://h/",
        "duration_s": 7.5,
        "sessions": {"started": 2, "completed": 2, "failed": 0, "open": 0, "errors": []},
        "hops": [
            _hop("ingest", _summary(20, 21, 22), _summary(20, 21, 22), 10, 10),
            _hop("model", _summary(176, 178, 190), _summary(156, 157, 168), 10, 9),
            _hop("return", _summary(180, 182, 200), _summary(4, 4, 10), 10, 10),
        ],
        "send_lag_ms": _summary(0.5, 1.2, 1.5, 300),
        "series": [],
    }
    r.update(over)
    return r


@pytest.mark.parametrize(
    ("text", "kind", "stat", "op", "limit", "hop"),
    [
        ("hop=model p95<250ms", "latency", "p95", "<", 250.0, "model"),
        ("markers>=99.9%", "markers", None, ">=", 99.9, None),
        ("reply p99<1.5s", "reply", "p99", "<", 1500.0, None),
        ("send_lag p99 <= 5 ms", "send_lag", "p99", "<=", 5.0, None),
        ("send_lag.p99<5ms", "send_lag", "p99", "<", 5.0, None),
        ("hop=b own.p95<40ms", "own", "p95", "<", 40.0, "b"),
        ("hop=b own p999 < 0.1s", "own", "p999", "<", 100.0, "b"),
        ("  p99 < 250ms ", "latency", "p99", "<", 250.0, None),
        ("sessions>=100%", "sessions", None, ">=", 100.0, None),
        ("hop=a.b-c_d markers>50%", "markers", None, ">", 50.0, "a.b-c_d"),
        ("mean>.5s", "latency", "mean", ">", 500.0, None),
        ("result p95<300ms", "result", "p95", "<", 300.0, None),
        ("result.p95<0.3s", "result", "p95", "<", 300.0, None),
        ("result.interim p95<200ms", "result.interim", "p95", "<", 200.0, None),
        ("result final p99 < 1s", "result.final", "p99", "<", 1000.0, None),
        ("result.final.p99<1s", "result.final", "p99", "<", 1000.0, None),
        ("first_interim p95<500ms", "first_interim", "p95", "<", 500.0, None),
        ("final p99<1s", "final_delay", "p99", "<", 1000.0, None),
        ("final_delay.p99<1s", "final_delay", "p99", "<", 1000.0, None),
        ("barge_in p95<400ms", "barge_in", "p95", "<", 400.0, None),
        ("clear p95<300ms", "clear", "p95", "<", 300.0, None),
        ("wer<15%", "wer", None, "<", 15.0, None),
        ("wer <= 0.15", "wer", None, "<=", 15.0, None),
    ],
)
def test_parse(
    text: str, kind: str, stat: str | None, op: str, limit: float, hop: str | None
) -> None:
    t = parse_threshold(text)
    assert (t.kind, t.stat, t.op, t.limit, t.hop) == (kind, stat, op, pytest.approx(limit), hop)
    assert t.text == text.strip()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("p95<250", "needs a unit"),
        ("p95<250%", "not '%'"),
        ("markers>=99.9", "percentage"),
        ("markers>=120%", "exceed 100"),
        ("p97<250ms", "unknown metric 'p97'"),
        ("latency<3ms", "unknown metric"),
        ("own.p95<40ms", "needs a hop"),
        ("own.p97<40ms", "unknown statistic 'p97'"),
        ("hop=x sessions>=90%", "does not apply to sessions"),
        ("hop=x reply p99<1s", "does not apply to reply"),
        ("hop=bad/name p95<1ms", "hop name"),
        ("p95=250ms", "operator"),
        ("p95<-3ms", "0 or more"),
        ("p95 < fast", "not of the form"),
        ("model p95<250ms", "unknown metric 'model p95'"),
        ("result p97<300ms", "unknown statistic 'p97' for result"),
        ("result.partial p95<300ms", "unknown metric 'result.partial p95'"),
        ("final p99<1", "needs a unit"),
        ("hop=x result p95<1s", "does not apply to result"),
        ("hop=x wer<15%", "does not apply to wer"),
        ("wer<15", "fraction of 1"),
        ("wer<15ms", "wer is a rate"),
    ],
)
def test_parse_errors_are_one_sentence(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_threshold(text)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg and msg.endswith(".")


def _check(report: dict[str, Any], text: str, *, implicit: bool = False) -> Any:
    v = judge(report, parse_thresholds([text]), implicit=implicit)
    assert len(v.checks) == 1
    return v.checks[0]


def test_latency_hop_end_to_end_and_own() -> None:
    r = _report()
    assert _check(r, "hop=model p95<250ms").ok
    c = _check(r, "hop=model p95<150ms")
    assert not c.ok and c.value == 178 and "breaches" in c.detail
    # No hop: end to end, the last hop of the report.
    assert _check(r, "p99<250ms").value == 200
    assert not _check(r, "p99<200ms").ok
    assert _check(r, "p99<=200ms").ok
    assert _check(r, "p99<0.2s").value == 200 and not _check(r, "p99<0.2s").ok
    assert _check(r, "hop=model own.p99<170ms").ok
    assert not _check(r, "hop=model own.p99>170ms").ok


def test_hop_never_seen_or_without_samples_is_a_breach() -> None:
    r = _report()
    c = _check(r, "hop=asr p95<250ms")
    assert not c.ok and c.value is None
    assert "'asr' was never seen" in c.detail and "ingest, model, return" in c.detail
    assert not _check(r, "hop=asr markers>=0%").ok
    r["hops"][1] = _hop("model", dict(_EMPTY), dict(_EMPTY), 10, 0)
    c = _check(r, "hop=model p95<250ms")
    assert not c.ok and "no samples" in c.detail
    assert not _check(_report(hops=[]), "p95<1s").ok


def test_markers_overall_and_per_hop() -> None:
    r = _report()
    c = _check(r, "markers>=99.9%")
    assert not c.ok and c.value == pytest.approx(100 * 29 / 30) and "29 of 30" in c.detail
    assert _check(r, "markers>=96%").ok
    assert _check(r, "hop=ingest markers>=100%").ok
    assert not _check(r, "hop=model markers>=100%").ok
    none_sent = _report(hops=[_hop("a", dict(_EMPTY), dict(_EMPTY), 0, 0)])
    c = _check(none_sent, "markers>=0%")
    assert not c.ok and "no markers were sent" in c.detail


def test_sessions_send_lag_and_reply() -> None:
    r = _report()
    assert _check(r, "send_lag p99<5ms").ok
    assert not _check(r, "send_lag p99<1ms").ok
    c = _check(r, "reply p99<1.5s")
    assert not c.ok and "no reply latency" in c.detail
    r["reply_ms"] = _summary(700, 900, 1200, 4)
    assert _check(r, "reply p99<1.5s").ok
    assert not _check(r, "reply p99<1s").ok
    r["reply_ms"] = dict(_EMPTY)
    assert not _check(r, "reply p99<1.5s").ok


def test_implicit_sessions_check_fails_a_down_target() -> None:
    down = _report(
        sessions={"started": 1, "completed": 0, "failed": 1, "open": 0,
                  "errors": [{"session": "s", "error": "cannot connect to ws://h/: refused"}]},
        hops=[],
    )
    v = judge(down, [])
    assert not v.ok
    (c,) = v.checks
    assert c.implicit and "cannot connect" in c.detail
    # An explicit sessions threshold replaces the implicit one.
    half = _report(sessions={"started": 2, "completed": 1, "failed": 1, "open": 0, "errors": []})
    assert not judge(half, []).ok
    v = judge(half, parse_thresholds(["sessions>=50%"]))
    assert v.ok and len(v.checks) == 1
    assert judge(_report(), []).ok


def test_format_verdict_is_compact_and_names_breaches() -> None:
    r = _report()
    v = judge(r, parse_thresholds(["hop=model p95<150ms", "markers>=90%"]))
    text = format_verdict(r, v)
    assert "FAIL hop=model p95<150ms" in text
    assert "ok   markers>=90%" in text
    assert "canary: FAIL (1 breached)" in text
    assert "model" in text.splitlines()[2] and "9/10" in text.splitlines()[2]
    assert format_verdict(r, judge(r, [])).endswith("canary: PASS")


def _conversation() -> dict[str, Any]:
    """A conversation section as the registry's log makes it."""
    log = ConversationLog()
    for i, ms in enumerate((100, 120, 140, 160, 180)):
        log.result(ResultTiming("s1", "interim", 1.0 + i, 1.0, ms / 1000.0, "the quick", 0))
    for i, ms in enumerate((250, 400)):
        log.result(ResultTiming("s1", "final", 5.0 + i, 5.0, ms / 1000.0, "the quick fox", 0))
    log.result(ResultTiming("s1", "final", 9.0, None, None, "jumps", 1))
    log.figure(Figure("s1", "first_interim", 0.5, 0.3, utterance=0))
    log.figure(Figure("s1", "final_delay", 4.0, 0.8, utterance=0))
    log.figure(Figure("s1", "final_delay", 8.0, None, "never finalized", 1))
    log.word_errors(WordErrors("s1", 2, 20, "the quick fox", "the quick brown fox"))
    log.word_errors(WordErrors("s2", 1, 20))
    return log.report()


def test_conversation_latencies_read_the_conversation_section() -> None:
    r = _report(conversation=_conversation())
    c = _check(r, "result.interim p50<200ms")
    assert c.ok and c.value == pytest.approx(140.0)
    assert "interim results' latency p50 over 5 samples" in c.detail
    c = _check(r, "result.final max<300ms")
    assert not c.ok and c.value == pytest.approx(400.0)
    assert "1 result without offsets not timed" in c.detail
    c = _check(r, "first_interim p95<500ms")
    assert c.ok and c.value == pytest.approx(300.0)
    # final = final_delay; the missed utterance is named, the check judged on what was measured.
    for text in ("final p99<1s", "final_delay p99<1s"):
        c = _check(r, text)
        assert c.ok and c.value == pytest.approx(800.0), c.detail
        assert "1 missed (never finalized: 1)" in c.detail
    assert not _check(r, "final p99<0.5s").ok


def test_result_pools_interim_and_final() -> None:
    # The registry's log pools both kinds ('all'): the pooled percentile is judged.
    c = _check(_report(conversation=_conversation()), "result p50<400ms")
    assert c.ok and c.value == pytest.approx(160.0)
    # A report without the pooled summary (an older one): mean and max pooled exactly; a
    # percentile by the kind that makes the check harder.
    old = _conversation()
    del old["results"]["all"]
    r = _report(conversation=old)
    assert _check(r, "result mean<1s").value == pytest.approx((700 + 650) / 7)
    assert _check(r, "result max<1s").value == pytest.approx(400.0)
    c = _check(r, "result p50<400ms")
    assert c.ok and c.value == pytest.approx(325.0) and "the larger" in c.detail
    c = _check(r, "result p50>100ms")
    assert c.ok and c.value == pytest.approx(140.0) and "the smaller" in c.detail
    assert not _check(r, "result p95<300ms").ok
    # A pooled summary, where the report has one, is used as it is.
    conv = _conversation()
    conv["results"]["all"] = {"latency_ms": _summary(150, 290, 390, 7)}
    c = _check(_report(conversation=conv), "result p95<300ms")
    assert c.ok and c.value == 290
    # Only one kind measured: that kind's figures, exactly.
    log = ConversationLog()
    log.result(ResultTiming("s", "final", 2.0, 1.9, 0.1, "x"))
    c = _check(_report(conversation=log.report()), "result p99<300ms")
    assert c.ok and c.value == pytest.approx(100.0)


def test_wer_as_percent_or_fraction() -> None:
    r = _report(conversation=_conversation())
    c = _check(r, "wer<15%")
    assert c.ok and c.value == pytest.approx(7.5)
    assert "3 word errors in 40 script words over 2 sessions" in c.detail
    assert _check(r, "wer<0.08").ok
    assert not _check(r, "wer<0.05").ok


@pytest.mark.parametrize(
    "text",
    ["result p95<300ms", "result.interim p95<1s", "final p99<1s", "barge_in p95<1s",
     "clear p95<1s", "first_interim p95<1s", "wer<15%"],
)
def test_conversation_thresholds_without_data_cannot_be_judged(text: str) -> None:
    c = _check(_report(), text)
    assert not c.ok and c.value is None
    assert "cannot judge: no conversation timing was measured in this run" in c.detail
    # A section with nothing for this figure: no samples (or no words), still a breach.
    log = ConversationLog()
    log.figure(Figure("s", "barge_in", 1.0, None, "the bot never fell silent"))
    log.result(ResultTiming("s", "final", 2.0, None, None, "x"))
    c = _check(_report(conversation=log.report()), text)
    assert not c.ok and c.value is None and c.detail.startswith("cannot judge: ")
    assert ("no final text was scored" if text.startswith("wer") else "has no samples") in c.detail
    if text.startswith("barge_in"):
        assert "1 missed (the bot never fell silent: 1)" in c.detail
