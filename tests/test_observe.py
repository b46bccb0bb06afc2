"""The observer hooks: the registry tells observers of every change; own latency joins live."""

from __future__ import annotations

from typing import Any

from probe.measure.observe import Observers, RunObserver
from probe.measure.registry import Measurement, Missed, SessionRegistry
from probe.protocol import TraceContext


class Recorder(RunObserver):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def session_ended(self, session: str, at: float, error: str | None) -> None:
        self.events.append(("ended", session, error))

    def hop_joined(self, hop: str, session: str | None, trace: TraceContext | None) -> None:
        self.events.append(("joined", hop, session, trace))

    def detected(self, m: Measurement, own_s: float | None) -> None:
        self.events.append(("detected", m.hop, m.seq, round(m.latency_s, 6), round(own_s or 0, 6)))

    def missed(self, m: Missed) -> None:
        self.events.append(("missed", m.hop, m.seq))

    def send_lag(self, session: str, lag_s: float) -> None:
        self.events.append(("lag", session, lag_s))


class Broken(RunObserver):
    def detected(self, m: Measurement, own_s: float | None) -> None:
        raise RuntimeError("boom")


def test_registry_tells_observers_and_own_latency_follows_declared_order() -> None:
    now = [100.0]
    rec = Recorder()
    obs = Observers([Broken(), rec], hop_order=["a", "b"])
    reg = SessionRegistry(clock=lambda: now[0], marker_timeout=5.0, observer=obs)
    reg.open_session("s1")
    ctx = TraceContext("1" * 32, "2" * 16, 1)
    reg.hop_connected("a", "s1", ctx)
    reg.hop_connected("b", "s1")
    reg.record_send("s1", 0, 100.0)
    reg.record_send("s1", 1, 101.0)
    reg.record_send_lag("s1", 0.002)
    reg.record_detection("a", reg.payload_for("s1", 0), 100.020, score=9.0)
    reg.record_detection("b", reg.payload_for("s1", 0), 100.055, score=9.0)
    now[0] = 110.0
    reg.expire()
    reg.close_session("s1")
    assert ("joined", "a", "s1", ctx) in rec.events
    assert ("detected", "a", 0, 0.02, 0.02) in rec.events
    assert ("detected", "b", 0, 0.055, 0.035) in rec.events
    assert ("missed", "a", 1) in rec.events and ("missed", "b", 1) in rec.events
    assert ("lag", "s1", 0.002) in rec.events
    assert rec.events[-1] == ("ended", "s1", None)


def test_a_later_hop_detected_first_waits_for_the_earlier_hops_outcome() -> None:
    now = [100.0]
    rec = Recorder()
    obs = Observers([rec], hop_order=["a", "b"])
    reg = SessionRegistry(clock=lambda: now[0], marker_timeout=5.0, observer=obs)
    reg.open_session("s1")
    reg.hop_connected("a", "s1")
    reg.hop_connected("b", "s1")
    for seq in range(3):
        reg.record_send("s1", seq, 100.0 + seq)
    # Marker 0: b is found before a; b is held until a's detection, then own = 55 - 20 ms.
    reg.record_detection("b", reg.payload_for("s1", 0), 100.055, score=9.0)
    assert not [e for e in rec.events if e[0] == "detected"]
    reg.record_detection("a", reg.payload_for("s1", 0), 100.020, score=9.0)
    assert [e for e in rec.events if e[0] == "detected"] == [
        ("detected", "a", 0, 0.02, 0.02), ("detected", "b", 0, 0.055, 0.035)]
    # Marker 1: b is found, a never is: b is passed on when a is declared missed.
    reg.record_detection("b", reg.payload_for("s1", 1), 101.055, score=9.0)
    assert ("detected", "b", 1, 0.055, 0.055) not in rec.events
    now[0] = 107.0
    reg.expire()
    assert rec.events.index(("missed", "a", 1)) < rec.events.index(
        ("detected", "b", 1, 0.055, 0.055))
    # Marker 2: b is found; the run closes before a's outcome: close passes it on.
    reg.record_detection("b", reg.payload_for("s1", 2), 102.056, score=9.0)
    assert ("detected", "b", 2, 0.056, 0.056) not in rec.events
    obs.close()
    assert ("detected", "b", 2, 0.056, 0.056) in rec.events


def test_undeclared_order_uses_running_mean_and_return_goes_last() -> None:
    obs = Observers([Recorder()])
    def m(hop: str, seq: int, lat: float) -> Measurement:
        return Measurement(hop, "s", seq, 0.0, lat, lat, 9.0)
    assert obs.own_latency(m("return", 0, 0.3)) == 0.3
    # "late" has no earlier hop for marker 0 yet: it owns its cumulative latency.
    assert obs.own_latency(m("late", 0, 0.2)) == 0.2
    # With "late" (mean 0.2) before "return", return's own latency is 0.3 - 0.2.
    assert abs(obs.own_latency(m("return", 1, 0.3)) - 0.3) < 1e-9
    assert abs(obs.own_latency(m("late", 1, 0.2)) - 0.2) < 1e-9
    assert abs(obs.own_latency(m("return", 2, 0.31)) - 0.31) < 1e-9
    obs.own_latency(m("late", 3, 0.2))
    assert abs(obs.own_latency(m("return", 3, 0.31)) - 0.11) < 1e-9
    obs.own_latency(m("early", 3, 0.05))
    assert abs(obs.own_latency(m("mid", 3, 0.12)) - 0.07) < 1e-9


def test_failed_session_is_told() -> None:
    rec = Recorder()
    reg = SessionRegistry(clock=lambda: 1.0, observer=rec)
    reg.session_failed("x", "cannot connect")
    assert rec.events == [("ended", "x", "cannot connect")]


def test_the_join_forgets_markers_once_every_hop_has_an_outcome() -> None:
    from probe.measure.latency import OwnLatencyJoin

    join = OwnLatencyJoin(["a", "b"])
    for hop in ("a", "b"):
        join.joined(hop, "s")
    for seq in range(1000):
        join.detected(Measurement("a", "s", seq, 0.0, 0.02, 0.02, 9.0))
        if seq % 2:
            join.missed("b", "s", seq)
        else:
            out = join.detected(Measurement("b", "s", seq, 0.0, 0.05, 0.05, 9.0))
            assert [round(own, 6) for _, own in out] == [0.03]
    assert len(join._markers) == 0 and len(join._held) == 0
