from __future__ import annotations

import json
from pathlib import Path

import pytest

from probe.errors import ConfigError
from probe.measure.conversation import Figure, ResultTiming, WordErrors
from probe.measure.registry import SessionRegistry
from probe.measure.report import (
    SCHEMA,
    build_report,
    format_table,
    json_ready,
    load_report,
    write_report,
)
from probe.measure.stats import SUMMARY_KEYS

DELAYS = {"ingress": 0.05, "asr": 0.2, "return": 0.35}


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run() -> SessionRegistry:
    clock = FakeClock(0.0)
    reg = SessionRegistry(clock=clock, expected_hops=["ingress", "asr", "return"])
    reg.session_failed("s-refused", "connection refused")
    for sid in ("s1", "s2"):
        reg.open_session(sid)
    for seq in range(10):
        t = seq * 0.5
        clock.t = t
        for sid in ("s1", "s2"):
            reg.record_send(sid, seq, t)
            reg.record_send_lag(sid, 0.001 * seq)
            for hop, delay in DELAYS.items():
                if hop == "asr" and seq == 4:
                    continue  # a missed middle hop
                reg.record_detection(hop, reg.payload_for(sid, seq), t + delay, score=9.0)
    reg.hop_error("asr", "s2", "stalled for 3 s")
    reg.close_session("s1")
    reg.close_session("s2", error="server closed with 1011")
    clock.t = 100.0
    reg.expire()
    return reg


def test_report_shape() -> None:
    reg = run()
    report = build_report(
        reg,
        target="ws://localhost:9000/stream",
        started_at=1_700_000_000.25,
        duration_s=5.0,
        reply=[0.8, 0.9],
        reply_missed=1,
        configured={"asr": 0.15},
    )
    assert report["schema"] == SCHEMA
    assert report["started_at"] == "2023-11-14T22:13:20.250Z"
    assert report["sessions"]["started"] == 3
    assert report["sessions"]["completed"] == 1
    assert report["sessions"]["failed"] == 2
    assert {"session": "s-refused", "error": "connection refused"} in report["sessions"]["errors"]
    names = [h["name"] for h in report["hops"]]
    assert names == ["ingress", "asr", "return"]
    by_name = {h["name"]: h for h in report["hops"]}
    asr = by_name["asr"]
    assert asr["markers"]["sent"] == 20
    assert asr["markers"]["detected"] == 18
    assert asr["markers"]["missed"] == 2
    assert asr["errors"] == [{"session": "s2", "error": "stalled for 3 s"}]
    assert asr["configured_ms"] == 150.0
    assert "configured_ms" not in by_name["ingress"]
    for h in report["hops"]:
        assert set(h["latency_ms"]) == set(SUMMARY_KEYS)
        assert set(h["own_latency_ms"]) == set(SUMMARY_KEYS)
    assert asr["latency_ms"]["p50"] == pytest.approx(200.0)
    assert asr["own_latency_ms"]["max"] == pytest.approx(150.0)
    ret_own = by_name["return"]["own_latency_ms"]
    # Own latency of return is 150 ms, or 300 ms for the marker asr missed.
    assert ret_own["max"] == pytest.approx(300.0) and ret_own["p50"] == pytest.approx(150.0)
    assert report["send_lag_ms"]["count"] == 20
    assert report["reply_ms"]["count"] == 2 and report["reply_missed"] == 1
    series = report["series"]
    assert len(series) == 2 * 10 * 3
    missed = [r for r in series if r["outcome"] == "missed"]
    assert [(r["hop"], r["marker"], r["latency_ms"]) for r in missed] == [
        ("asr", 4, None),
        ("asr", 4, None),
    ]
    first = series[0]
    assert first == {
        "hop": "ingress",
        "session": "s1",
        "marker": 0,
        "send_time": 0.0,
        "latency_ms": 50.0,
        "outcome": "detected",
    }
    json.dumps(json_ready(report), allow_nan=False)


def test_no_reply_key_without_replies() -> None:
    report = build_report(run(), target="t", started_at=0.0, duration_s=1.0)
    assert "reply_ms" not in report


def test_declared_order_and_empty_registry() -> None:
    reg = SessionRegistry(clock=FakeClock(), expected_hops=["b", "a"])
    report = build_report(reg, target="t", started_at=0.0, duration_s=0.0, hop_order=["a"])
    assert [h["name"] for h in report["hops"]] == ["a", "b"]
    assert report["hops"][0]["latency_ms"]["count"] == 0
    assert report["series"] == []
    assert "a" in format_table(report)


def test_json_round_trip(tmp_path: Path) -> None:
    report = build_report(run(), target="t", started_at=0.0, duration_s=5.0, reply=[0.5])
    path = tmp_path / "report.json"
    write_report(report, path)
    assert load_report(path) == report
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    write_report(report, path)  # replaces atomically
    assert load_report(path) == report


def test_load_report_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "probe.report/v0"}')
    with pytest.raises(ConfigError, match="schema"):
        load_report(bad)
    bad.write_text("not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_report(bad)
    bad.write_text('{"schema": "probe.report/v1"}')
    with pytest.raises(ConfigError, match="lacks"):
        load_report(bad)
    with pytest.raises(ConfigError, match="Cannot read"):
        load_report(tmp_path / "missing.json")


def test_format_table() -> None:
    report = build_report(
        run(), target="t", started_at=0.0, duration_s=5.0, configured={"asr": 0.15}, reply=[0.8]
    )
    text = format_table(report)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["hop", "p50", "p95", "p99", "max"]
    asr = next(line for line in lines if line.startswith("asr"))
    assert asr.split()[-4:] == ["20", "18", "2", "150.0"]
    assert "sessions: 3 started, 1 completed, 2 failed" in text
    assert "send lag (ms)" in text
    assert "reply (ms)" in text


def test_an_interrupted_run_settles_what_is_pending_as_unmeasured() -> None:
    clock = FakeClock(0.0)
    reg = SessionRegistry(clock=clock, marker_timeout=5.0, expected_hops=["a"])
    reg.open_session("s")
    for seq in range(4):
        reg.record_send("s", seq, seq * 1.0)
    reg.record_detection("a", reg.payload_for("s", 0), 0.02, score=9.0)
    clock.t = 6.5  # marker 1 (sent at 1.0) is past its timeout; 2 and 3 are not
    reg.expire()
    assert len(reg.settle_all(unmeasured=True)) == 2
    report = build_report(reg, target="ws://h/", started_at=0.0, duration_s=6.5,
                          interrupted={"signal": "SIGINT", "after_s": 6.4, "unmeasured": 2})
    assert report["hops"][0]["markers"] == {
        "sent": 4, "detected": 1, "missed": 1, "unmeasured": 2, "duplicates": 0,
        "unmatched": 0, "late": 0}
    assert [r["outcome"] for r in report["series"]] == [
        "detected", "missed", "unmeasured", "unmeasured"]
    assert report["interrupted"] == {"signal": "SIGINT", "after_s": 6.4, "unmeasured": 2}
    assert report["sessions"]["open"] == 1
    table = format_table(report)
    assert table.startswith("INTERRUPTED by SIGINT after 6.4 s: a partial report (sessions "
                            "still open: 1; 2 markers still pending")
    whole = build_report(reg, target="ws://h/", started_at=0.0, duration_s=6.5)
    assert whole["interrupted"] is None and "INTERRUPTED" not in format_table(whole)


def test_conversation_section_and_its_summary_lines() -> None:
    reg = SessionRegistry(clock=FakeClock())
    reg.open_session("s1")
    for i, ms in enumerate((100, 200, 300)):
        reg.record_result(ResultTiming("s1", "interim", 1.0 + i, 1.0, ms / 1000.0, "the", 0))
    reg.record_result(ResultTiming("s1", "final", 4.0, 3.6, 0.4, "the quick brown fox", 0))
    reg.record_result(ResultTiming("s1", "final", 6.0, None, None, "jumps", 1))
    reg.record_malformed_result("s1", "not JSON")
    reg.record_figure(Figure("s1", "first_interim", 0.5, 0.6, utterance=0))
    reg.record_figure(Figure("s1", "final_delay", 3.6, 0.4, utterance=0))
    reg.record_figure(Figure("s1", "final_delay", 5.6, None, "never finalized", 1))
    reg.record_barge_in("s1", talked_over=True)
    reg.record_barge_in("s1", talked_over=False)
    reg.record_figure(Figure("s1", "barge_in", 7.0, 0.25))
    reg.record_figure(Figure("s1", "barge_in", 9.0, None, "the bot never fell silent"))
    reg.record_word_errors(WordErrors("s1", 1, 20, "the quick brown fox", "the quick brown fox."))
    reg.close_session("s1")
    report = build_report(reg, target="t", started_at=0.0, duration_s=10.0)
    conv = report["conversation"]
    assert conv["results"]["final"]["count"] == 2
    assert conv["results"]["final"]["without_offsets"] == 1
    assert conv["barge_in"]["talked_over"] == 1 and conv["wer"]["rate"] == 0.05
    lines = format_table(report).splitlines()
    assert "interim results (ms): p50 200.0, p95 290.0, p99 298.0, max 300.0 (n=3)" in lines
    assert (
        "final results (ms): p50 400.0, p95 400.0, p99 400.0, max 400.0 (n=1), "
        "1 of 2 without offsets (not timed)" in lines
    )
    assert "malformed results: 1 (not JSON: 1)" in lines
    assert "first interim (ms): p50 600.0, p95 600.0, p99 600.0, max 600.0 (n=1)" in lines
    assert (
        "final delay (ms): p50 400.0, p95 400.0, p99 400.0, max 400.0 (n=1), "
        "1 missed (never finalized: 1)" in lines
    )
    assert (
        "barge-in (ms): p50 250.0, p95 250.0, p99 250.0, max 250.0 (n=1), 2 barge-ins, "
        "1 talked over, 1 missed (the bot never fell silent: 1)" in lines
    )
    assert "WER 5.0% (1 word error in 20 script words)" in lines
    assert not any(line.startswith("clear") for line in lines)
    # A run without conversation timing has neither the section nor the lines.
    plain = build_report(run(), target="t", started_at=0.0, duration_s=5.0)
    assert "conversation" not in plain
    assert "results" not in format_table(plain) and "WER" not in format_table(plain)
