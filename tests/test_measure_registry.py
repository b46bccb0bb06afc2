from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.errors import ConfigError
from probe.measure.registry import (
    MAX_ERRORS,
    HopCounts,
    Measurement,
    Missed,
    SessionRegistry,
    token_for,
)
from probe.watermark.design import session_payload, split_session_payload


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def registry(clock: FakeClock, **kw: object) -> SessionRegistry:
    return SessionRegistry(clock=clock, **kw)  # type: ignore[arg-type]


def check_accounting(reg: SessionRegistry) -> dict[str, HopCounts]:
    counts = reg.hop_counts()  # raises if the invariant is broken
    for c in counts.values():
        assert c.sent == c.detected + c.missed + c.pending
    return counts


def colliding_ids() -> tuple[str, str]:
    seen: dict[int, str] = {}
    i = 0
    while True:
        sid = f"session-{i}"
        tok = token_for(sid)
        if tok in seen:
            return seen[tok], sid
        seen[tok] = sid
        i += 1


# -- tokens -------------------------------------------------------------------------------------


def test_token_is_24_bit_and_deterministic() -> None:
    reg = registry(FakeClock())
    tok = reg.open_session("abc")
    assert tok == token_for("abc") < 2**24
    assert reg.token_of("abc") == tok
    assert registry(FakeClock()).open_session("abc") == tok


def test_token_collision_takes_next_candidate_and_is_freed_on_drop() -> None:
    a, b = colliding_ids()
    assert token_for(a) == token_for(b)
    clock = FakeClock()
    reg = registry(clock, session_ttl=5.0)
    ta = reg.open_session(a)
    tb = reg.open_session(b)
    assert ta != tb
    assert tb == token_for(b, 1)
    # Markers of the two sessions resolve to their own session.
    reg.hop_connected("h", a)
    reg.hop_connected("h", b)
    reg.record_send(a, 0, clock.t)
    reg.record_send(b, 0, clock.t)
    mb = reg.record_detection("h", reg.payload_for(b, 0), clock.t + 0.1, score=9.0)
    assert mb is not None and mb.session == b
    # Once a's session is dropped, its token is free again.
    reg.close_session(a)
    reg.close_session(b)
    clock.advance(20.0)
    reg.expire()
    assert reg.live_sessions() == []
    assert reg.open_session(b) == token_for(b)


def test_many_sessions_get_unique_tokens() -> None:
    reg = registry(FakeClock())
    tokens = [reg.open_session(f"s{i}") for i in range(6000)]
    assert len(set(tokens)) == len(tokens)


def test_duplicate_session_id_refused() -> None:
    reg = registry(FakeClock())
    reg.open_session("s")
    with pytest.raises(ConfigError, match="already open"):
        reg.open_session("s")
    with pytest.raises(ConfigError):
        reg.open_session("")
    with pytest.raises(ConfigError, match="Unknown session"):
        reg.record_send("nope", 0, 0.0)


def test_payload_carries_token_and_low_marker_bits() -> None:
    reg = registry(FakeClock())
    tok = reg.open_session("s")
    assert split_session_payload(reg.payload_for("s", 0)) == (tok, 0)
    assert split_session_payload(reg.payload_for("s", 300)) == (tok, 300 - 256)
    with pytest.raises(ConfigError):
        reg.payload_for("s", -1)


def test_bad_config_refused() -> None:
    with pytest.raises(ConfigError):
        registry(FakeClock(), marker_timeout=0)
    with pytest.raises(ConfigError):
        registry(FakeClock(), session_ttl=-1)
    with pytest.raises(ConfigError):
        registry(FakeClock(), expected_hops="asr")


# -- detections ---------------------------------------------------------------------------------


def test_wrap_around_over_many_markers() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["a", "b"])
    reg.open_session("s")
    got: list[Measurement] = []
    n = 700  # > 2 * 256
    for seq in range(n):
        reg.record_send("s", seq, clock.t)
        pay = reg.payload_for("s", seq)
        for hop, delay in (("a", 0.2), ("b", 1.3)):
            m = reg.record_detection(hop, pay, clock.t + delay, score=10.0)
            assert m is not None
            got.append(m)
        clock.advance(0.5)
        assert reg.expire() == []
    assert [m.seq for m in got if m.hop == "a"] == list(range(n))
    assert all(m.latency_s == pytest.approx(0.2) for m in got if m.hop == "a")
    assert all(m.latency_s == pytest.approx(1.3) for m in got if m.hop == "b")
    counts = check_accounting(reg)
    assert counts["a"] == HopCounts(n, n, 0, 0, 0, 0)


def test_wrap_around_picks_latest_send_before_arrival() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["h"], marker_timeout=1000.0)
    reg.open_session("s")
    for seq in range(260):
        reg.record_send("s", seq, seq * 0.5)
    # Marker 3 (sent at 1.5 s) shares its number with 259 (sent at 129.5 s).
    m_old = reg.record_detection("h", reg.payload_for("s", 3), 2.0, score=9.0)
    m_new = reg.record_detection("h", reg.payload_for("s", 259), 130.0, score=9.0)
    assert m_old is not None and m_old.seq == 3
    assert m_new is not None and m_new.seq == 259 and m_new.latency_s == pytest.approx(0.5)


def test_unknown_and_malformed_payloads_are_counted_not_raised() -> None:
    clock = FakeClock()
    reg = registry(clock, expected_hops=["h"])
    tok = reg.open_session("s")
    reg.record_send("s", 0, clock.t)
    other = (tok + 1) % 2**24
    assert reg.record_detection("h", session_payload(other, 0), clock.t, score=5.0) is None
    assert reg.record_detection("h", b"\x01\x02", clock.t, score=5.0) is None
    # Right token, but no marker with that number was sent.
    assert reg.record_detection("h", reg.payload_for("s", 7), clock.t, score=5.0) is None
    # A hint naming another session does not override the payload.
    m = reg.record_detection(
        "h", reg.payload_for("s", 0), clock.t + 0.1, score=5.0, session_hint="other"
    )
    assert m is not None and m.session == "s"
    # Unknown hop seen only through garbage still gets a row.
    reg.record_detection("stray", b"\xff\xff\xff\xff", clock.t, score=5.0)
    counts = check_accounting(reg)
    assert counts["h"].unmatched == 3
    assert counts["h"].detected == 1
    assert counts["stray"] == HopCounts(0, 0, 0, 0, 0, 1)


def test_arrival_before_send_is_unmatched_beyond_tolerance() -> None:
    clock = FakeClock(100.0)
    reg = registry(clock, expected_hops=["h"])
    reg.open_session("s")
    reg.record_send("s", 0, 100.0)
    assert reg.record_detection("h", reg.payload_for("s", 0), 99.9, score=5.0) is None
    m = reg.record_detection("h", reg.payload_for("s", 0), 99.97, score=5.0)
    assert m is not None and m.latency_s == pytest.approx(-0.03)
    assert check_accounting(reg)["h"].unmatched == 1


def test_duplicates_counted_once_measured() -> None:
    clock = FakeClock()
    reg = registry(clock, expected_hops=["h"])
    reg.open_session("s")
    reg.record_send("s", 0, clock.t)
    pay = reg.payload_for("s", 0)
    first = reg.record_detection("h", pay, clock.t + 0.2, score=8.0)
    assert first is not None and first.score == 8.0
    assert reg.record_detection("h", pay, clock.t + 0.21, score=7.0) is None
    assert reg.record_detection("h", pay, clock.t + 0.22, score=7.0) is None
    c = check_accounting(reg)["h"]
    assert (c.detected, c.duplicates, c.sent) == (1, 2, 1)
    assert reg.measurements() == [first]


# -- misses -------------------------------------------------------------------------------------


def test_misses_appear_after_the_timeout_never_before() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["a", "b"], marker_timeout=10.0)
    reg.open_session("s")
    reg.record_send("s", 0, 0.0)
    reg.record_send("s", 1, 0.5)
    reg.record_detection("a", reg.payload_for("s", 0), 0.3, score=9.0)
    for t in (0.0, 5.0, 9.999, 10.0):
        clock.t = t
        assert reg.expire() == []
        c = check_accounting(reg)
        assert c["a"].missed == 0 and c["b"].missed == 0
    clock.t = 10.01
    assert reg.expire() == [Missed("b", "s", 0, 0.0)]
    clock.t = 10.6
    assert {(m.hop, m.seq) for m in reg.expire()} == {("a", 1), ("b", 1)}
    c = check_accounting(reg)
    assert c["a"] == HopCounts(2, 1, 1, 0, 0, 0)
    assert c["b"] == HopCounts(2, 0, 2, 0, 0, 0)
    clock.t = 100.0
    assert reg.expire() == []


def test_late_detection_after_miss_changes_nothing_else() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["h"], marker_timeout=2.0)
    reg.open_session("s")
    reg.record_send("s", 0, 0.0)
    clock.t = 3.0
    assert len(reg.expire()) == 1
    assert reg.record_detection("h", reg.payload_for("s", 0), 3.0, score=9.0) is None
    c = check_accounting(reg)["h"]
    assert (c.sent, c.detected, c.missed, c.late) == (1, 0, 1, 1)


def test_hop_that_joins_is_owed_every_marker_of_the_session() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, marker_timeout=5.0)
    reg.open_session("s")
    reg.open_session("t")
    for seq in range(4):
        reg.record_send("s", seq, seq * 0.5)
        reg.record_send("t", seq, seq * 0.5)
    assert check_accounting(reg) == {}
    reg.hop_connected("asr", "s")
    # A hop first seen through a detection joins too, and only for that session.
    m = reg.record_detection("tts", reg.payload_for("s", 2), 1.4, score=9.0)
    assert m is not None and m.seq == 2
    c = check_accounting(reg)
    assert c["asr"] == HopCounts(4, 0, 0, 4, 0, 0)
    assert c["tts"] == HopCounts(4, 1, 0, 3, 0, 0)
    reg.record_send("s", 4, 2.0)
    assert check_accounting(reg)["tts"].sent == 5
    clock.t = 100.0
    assert {(x.hop, x.session) for x in reg.expire()} == {("asr", "s"), ("tts", "s")}
    c = check_accounting(reg)
    assert c["asr"].missed == 5 and c["tts"].missed == 4


def test_settle_all_marks_pending_missed() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["h"])
    reg.open_session("s")
    reg.record_send("s", 0, 0.0)
    reg.record_send("s", 1, 0.5)
    reg.record_detection("h", reg.payload_for("s", 1), 0.7, score=9.0)
    clock.t = 1.0
    assert reg.settle_all() == [Missed("h", "s", 0, 0.0)]
    assert check_accounting(reg)["h"] == HopCounts(2, 1, 1, 0, 0, 0)
    assert [type(x) for x in reg.series()] == [Measurement, Missed]


# -- sessions -----------------------------------------------------------------------------------


def test_session_accounting() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, session_ttl=30.0)
    reg.session_failed("refused", "connection refused")
    reg.open_session("ok")
    reg.open_session("bad")
    reg.open_session("idle")
    reg.close_session("ok")
    reg.close_session("bad", error="stalled")
    reg.hop_error("asr", "bad", "garbage on the fork")
    reg.hop_error("asr", None, "fork connection dropped")
    sc = reg.session_counts()
    assert (sc.started, sc.completed, sc.failed, sc.open) == (4, 1, 2, 1)
    assert [(e.session, e.error) for e in sc.errors] == [
        ("refused", "connection refused"),
        ("bad", "stalled"),
    ]
    assert [e.as_dict() for e in reg.hop_errors()["asr"]] == [
        {"session": "bad", "error": "garbage on the fork"},
        {"session": None, "error": "fork connection dropped"},
    ]
    # A session that completed and then failed counts once, as failed.
    reg.session_failed("ok", "late error")
    sc = reg.session_counts()
    assert (sc.completed, sc.failed) == (0, 3)
    clock.t = 31.0
    reg.expire()
    sc = reg.session_counts()
    assert (sc.started, sc.completed, sc.failed, sc.open) == (4, 0, 4, 0)
    assert "idle" in sc.errors[-1].error and sc.errors[-1].session == "idle"
    assert reg.live_sessions() == []


def test_closed_session_kept_until_settled_and_ttl() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["h"], marker_timeout=10.0, session_ttl=2.0)
    reg.open_session("s")
    reg.record_send("s", 0, 0.0)
    reg.close_session("s")
    clock.t = 5.0
    reg.expire()
    assert reg.live_sessions() == ["s"]  # its marker is still pending
    # A detection after the close still resolves.
    assert reg.record_detection("h", reg.payload_for("s", 0), 5.0, score=9.0) is not None
    reg.expire()
    assert reg.live_sessions() == []
    # After the drop its payloads are unknown.
    payload = session_payload(token_for("s"), 0)
    assert reg.record_detection("h", payload, 6.0, score=9.0) is None
    assert check_accounting(reg)["h"].unmatched == 1


def test_send_lag_recorded() -> None:
    reg = registry(FakeClock())
    reg.open_session("s")
    reg.record_send_lag("s", 0.002)
    reg.record_send_lag("s", 0.004)
    assert reg.send_lag().to_list() == [0.002, 0.004]


# -- invariants ---------------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("detect"), st.integers(0, 2), st.integers(0, 40)),
        st.tuples(st.just("garbage"), st.integers(0, 2), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("tick"), st.integers(0, 2), st.integers(1, 8)),
        st.tuples(st.just("expire"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("connect"), st.integers(0, 2), st.integers(0, 3)),
        st.tuples(st.just("close"), st.integers(0, 2), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_sent_is_detected_plus_missed_plus_pending_always(ops: list[tuple[str, int, int]]) -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["h0"], marker_timeout=3.0, session_ttl=4.0)
    hops = ["h0", "h1", "h2", "h3"]
    sessions = [f"s{i}" for i in range(3)]
    next_seq = dict.fromkeys(sessions, 0)
    open_ = set()
    for op, i, arg in ops:
        sid = sessions[i]
        if sid not in reg.live_sessions():
            reg.open_session(sid)
            next_seq[sid] = 0
            open_.add(sid)
        if op == "send":
            reg.record_send(sid, next_seq[sid], clock.t)
            next_seq[sid] += 1
        elif op == "detect":
            reg.record_detection(hops[arg % 4], reg.payload_for(sid, arg), clock.t, score=9.0)
        elif op == "garbage":
            reg.record_detection("h1", arg.to_bytes(4, "big"), clock.t, score=4.0)
        elif op == "tick":
            clock.advance(arg * 0.5)
        elif op == "expire":
            reg.expire()
        elif op == "connect":
            reg.hop_connected(hops[arg], sid)
        elif op == "close" and sid in open_:
            reg.close_session(sid)
            open_.discard(sid)
        check_accounting(reg)
    reg.settle_all()
    counts = check_accounting(reg)
    assert all(c.pending == 0 for c in counts.values())
    assert sum(c.detected for c in counts.values()) == len(reg.measurements())
    assert sum(c.missed for c in counts.values()) == len(reg.misses())


def test_threads_share_one_registry_under_the_lock_their_shell_gives() -> None:
    clock = FakeClock(0.0)
    reg = registry(clock, expected_hops=["h"], marker_timeout=1000.0, lock=threading.Lock())
    reg.open_session("s")
    n = 2000

    def source() -> None:
        for seq in range(n):
            reg.record_send("s", seq, seq * 0.01)

    def sink() -> None:
        for seq in range(n):
            reg.record_detection("h", reg.payload_for("s", seq), seq * 0.01 + 0.001, score=9.0)
            reg.hop_counts()

    threads = [threading.Thread(target=source), threading.Thread(target=sink)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = check_accounting(reg)["h"]
    assert c.sent == n
    assert c.detected + c.unmatched + c.duplicates == n


def test_without_history_nothing_grows_with_the_run_but_the_counts_stay_exact() -> None:

    clock = FakeClock(0.0)
    heard: list[str] = []

    class Ear:
        def __getattr__(self, name: str) -> Any:
            return lambda *a: heard.append(name)

    reg = registry(clock, marker_timeout=1.0, history=False, observer=Ear())
    for k in range(300):
        s = f"s{k}"
        reg.open_session(s)
        reg.hop_connected("h", s)
        for seq in range(4):
            reg.record_send(s, seq, clock.t)
            reg.record_send_lag(s, 0.001)
            if seq < 3:
                reg.record_detection("h", reg.payload_for(s, seq), clock.t + 0.02, score=9.0)
        reg.hop_error("h", s, "garbage")
        reg.record_reply(s, clock.t, 0.5)
        reg.close_session(s, error="boom")
        clock.advance(2.0)
        reg.expire()
    counts = check_accounting(reg)["h"]
    assert (counts.sent, counts.detected, counts.missed) == (1200, 900, 300)
    assert reg.series() == [] and reg.send_lag().count == 0 and reg.replies() == ([], 0)
    assert len(reg.hop_errors()["h"]) == min(300, MAX_ERRORS)
    assert reg.session_counts().failed == 300
    assert heard.count("detected") == 900 and heard.count("missed") == 300
    assert heard.count("send_lag") == 1200 and heard.count("reply") == 300


def test_errors_outside_any_session_are_one_note_per_reason_with_a_count() -> None:
    clock = FakeClock()
    for history in (True, False):
        reg = registry(clock, history=history)
        reg.open_session("s1")
        for _ in range(221):
            reg.hop_error("unknown", None, "fork idle for 30 s before its start")
        reg.hop_error("unknown", None, "fork closed without stop")
        reg.hop_error("unknown", "s1", "garbage on the fork")
        reg.hop_error("unknown", "s1", "garbage on the fork")  # per session: kept as they are
        reg.hop_error("unknown", None, "fork closed without stop")
        assert [e.as_dict() for e in reg.hop_errors()["unknown"]] == [
            {"session": None, "error": "fork idle for 30 s before its start", "count": 221},
            {"session": None, "error": "fork closed without stop", "count": 2},
            {"session": "s1", "error": "garbage on the fork"},
            {"session": "s1", "error": "garbage on the fork"},
        ]


def test_error_notes_stay_bounded_without_history() -> None:
    reg = registry(FakeClock(), history=False)
    for k in range(MAX_ERRORS + 50):
        reg.hop_error("h", None, f"reason {k}")
        reg.hop_error("h", None, "the same reason")
    notes = reg.hop_errors()["h"]
    assert len(notes) == MAX_ERRORS
    assert notes[-1].error == f"reason {MAX_ERRORS + 49}"
