from __future__ import annotations

import pytest

from probe.measure.latency import hop_order, own_latencies
from probe.measure.registry import Measurement


def m(hop: str, seq: int, latency: float, session: str = "s") -> Measurement:
    return Measurement(hop, session, seq, 100.0, 100.0 + latency, latency, 10.0)


def test_order_by_median_with_return_last() -> None:
    ms = [m("return", 0, 0.05), m("b", 0, 0.3), m("a", 0, 0.1), m("a", 1, 0.9), m("a", 2, 0.1)]
    assert hop_order(ms, None) == ["a", "b", "return"]


def test_declared_order_with_extras_appended() -> None:
    ms = [m("x", 0, 0.5), m("a", 0, 0.1), m("y", 0, 0.2), m("return", 0, 0.0)]
    assert hop_order(ms, ["b", "a"]) == ["b", "a", "y", "x", "return"]
    assert hop_order(ms, ["return", "a"]) == ["return", "a", "y", "x"]
    assert hop_order([], None, known=["z", "return"]) == ["z", "return"]


def test_own_latency_with_missing_middle_hop() -> None:
    order = ["asr", "llm", "tts"]
    ms = [
        m("asr", 0, 0.10),
        m("llm", 0, 0.25),
        m("tts", 0, 0.40),
        # marker 1: llm missed it, so tts's own latency is measured from asr
        m("asr", 1, 0.12),
        m("tts", 1, 0.52),
        # marker 2: only tts saw it: it owns all of it
        m("tts", 2, 0.45),
        m("other", 2, 9.0),
    ]
    own = own_latencies(ms, order)
    assert set(own) == set(order)
    assert own["asr"] == pytest.approx([0.10, 0.12])
    assert own["llm"] == pytest.approx([0.15])
    assert sorted(own["tts"]) == pytest.approx([0.15, 0.40, 0.45])


def test_own_latency_keeps_sessions_apart() -> None:
    ms = [m("a", 0, 0.1, "s1"), m("b", 0, 0.5, "s2")]
    own = own_latencies(ms, ["a", "b"])
    assert own == {"a": [0.1], "b": [0.5]}


def test_the_join_forgets_a_session_once_it_ended_long_enough_ago() -> None:
    from probe.measure.latency import OwnLatencyJoin

    join = OwnLatencyJoin(("a", "b"), linger_s=120.0)
    for k in range(3600):  # an hour of sessions, one a second, each ending 20 s after its start
        join.joined("a", f"s{k}")
        join.joined("b", f"s{k}")
        if k >= 20:
            join.ended(f"s{k - 20}", float(k))
    # Remembered: the 20 running and those that ended within the last 120 s.
    assert len(join._joined) <= 20 + 121
    assert "s3599" in join._joined and "s0" not in join._joined
