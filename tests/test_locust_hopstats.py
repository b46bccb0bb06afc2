"""The Hops tab's statistics: exact values, own latency join, worker-to-master merge, CSV,
own p95 over time."""

from __future__ import annotations

import csv
import io

import msgpack
import numpy as np
import pytest

from probe.config import EngineConfig
from probe.errors import ConfigError
from probe.locust.hopstats import HopsStats, LagHistogram, OwnP95Series, Totals


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _row(rows: list[dict[str, object]], name: str) -> dict[str, object]:
    return next(r for r in rows if r["name"] == name)


def test_quantiles_are_exact_not_rounded_to_two_digits() -> None:
    s = HopsStats(["a"])
    values = [0.1374 + 0.0001 * i for i in range(1000)]
    for v in values:
        s.add_detection("a", v, v)
    s.set_totals("local", Totals({"a": {"sent": 1000, "detected": 1000, "missed": 0}}, {}))
    row = _row(s.rows(), "a")
    want = np.quantile(np.array(values), [0.5, 0.99, 0.999]) * 1000
    assert row["p50"] == pytest.approx(round(want[0], 3))
    assert row["p99"] == pytest.approx(round(want[1], 3))
    assert row["p999"] == pytest.approx(round(want[2], 3))
    assert row["max"] == pytest.approx(round(values[-1] * 1000, 3))
    assert row["sent"] == 1000 and row["detected"] == 1000


def test_own_latency_reaches_the_hops_tab_by_the_one_join_whatever_the_detection_order() -> None:
    from probe.locust.report import LocustReporter
    from probe.measure.observe import Observers
    from probe.measure.registry import SessionRegistry

    class Events:
        class request:  # noqa: N801 - Locust's event hook name
            @staticmethod
            def fire(**_kw: object) -> None:
                return None

    s = HopsStats(["a", "b"])
    obs = Observers([LocustReporter(Events(), s, marker_timeout_s=5.0)], hop_order=["a", "b"])
    reg = SessionRegistry(clock=lambda: 10.0, marker_timeout=5.0, observer=obs)
    reg.open_session("s")
    for hop in ("a", "b", "return"):
        reg.hop_connected(hop, "s")
    reg.record_send("s", 0, 10.0)
    # The return direction and b are detected before a: own latency must still subtract a.
    reg.record_detection("return", reg.payload_for("s", 0), 10.180, score=9.0)
    reg.record_detection("b", reg.payload_for("s", 0), 10.055, score=9.0)
    assert not s.own
    reg.record_detection("a", reg.payload_for("s", 0), 10.020, score=9.0)
    rows = s.rows()
    assert _row(rows, "a")["ownp50"] == pytest.approx(20.0)
    assert _row(rows, "b")["ownp50"] == pytest.approx(35.0)
    assert _row(rows, "return")["ownp50"] == pytest.approx(125.0)
    assert [r["name"] for r in rows][:3] == ["a", "b", "return"]


def test_undeclared_hops_are_ordered_by_latency() -> None:
    s = HopsStats()
    s.add_detection("late", 0.100, 0.070)
    s.add_detection("early", 0.030, 0.030)
    s.add_detection("early", 0.031, 0.031)
    rows = s.rows()
    assert [r["name"] for r in rows][:2] == ["early", "late"]
    assert _row(rows, "late")["ownp50"] == pytest.approx(70.0)
    assert _row(rows, "early")["ownmax"] == pytest.approx(31.0)


def test_worker_reports_merge_on_the_master_through_msgpack() -> None:
    w1, w2 = HopsStats(["a"], for_master=True), HopsStats(["a"], for_master=True)
    master = HopsStats(["a"])
    for i in range(10):
        w1.add_detection("a", 0.020 + i * 0.001, 0.020 + i * 0.001)
        w1.add_send_lag(0.0005)
    for _ in range(5):
        w2.add_detection("a", 0.050, 0.050)
        w2.add_send_lag(0.003)
    t1 = Totals({"a": {"sent": 11, "detected": 10, "missed": 1, "pending": 0}},
                {"started": 2, "completed": 2, "failed": 0, "active": 1, "late_starts": 0})
    t2 = Totals({"a": {"sent": 5, "detected": 5, "missed": 0, "pending": 0}},
                {"started": 1, "completed": 1, "failed": 0, "active": 1, "late_starts": 3})
    for wid, w, t in (("w1", w1, t1), ("w2", w2, t2)):
        wire = msgpack.unpackb(msgpack.packb(w.take_report(t)), strict_map_key=False)
        master.merge_report(wid, wire)
    # A second report carries only what is new, and the latest totals replace the old ones.
    master.merge_report("w1", msgpack.unpackb(msgpack.packb(w1.take_report(t1))))
    row = _row(master.rows(), "a")
    assert row["sent"] == 16 and row["detected"] == 15 and row["missed"] == 1
    assert row["max"] == pytest.approx(50.0)
    assert master.cumulative["a"].count == 15
    lag = _row(master.rows(), "send lag")
    assert lag["p50"] == pytest.approx(0.5) and lag["max"] == pytest.approx(3.0)
    note = str(_row(master.rows(), "sessions")["note"])
    assert "started 3" in note and "active 2" in note and "late starts 3" in note


def test_lag_histogram_quantiles_to_ten_microseconds() -> None:
    h = LagHistogram()
    rng = np.random.default_rng(1)
    lags = rng.exponential(0.001, 5000)
    for v in lags:
        h.add(float(v))
    s = h.summary_ms()
    assert s["count"] == 5000
    exact = np.quantile(lags, [0.5, 0.99]) * 1000
    assert abs(float(s["p50"] or 0) - exact[0]) <= 0.011
    assert abs(float(s["p99"] or 0) - exact[1]) <= 0.011
    assert s["max"] == pytest.approx(round(round(lags.max() / 1e-5) * 1e-2, 3))


def test_csv_has_a_row_per_hop_and_the_send_lag_and_sessions_rows() -> None:
    s = HopsStats(["a"])
    s.add_detection("a", 0.0213, 0.0213)
    s.set_totals("local", Totals({"a": {"sent": 1, "detected": 1}}, {"started": 1}))
    rows = list(csv.reader(io.StringIO(s.csv())))
    assert rows[0][:3] == ["Hop", "Markers sent", "Detected"]
    assert [r[0] for r in rows[1:]] == ["a", "send lag", "sessions"]
    assert float(rows[1][rows[0].index("p50 ms")]) == pytest.approx(21.3)


def test_an_overloaded_worker_puts_a_warning_row_first() -> None:
    s = HopsStats(["a"])
    s.add_detection("a", 0.0213, 0.0213)
    s.set_totals("w1", Totals({"a": {"sent": 10, "detected": 7, "unmeasured": 3}},
                              {"started": 1, "overloaded": 1}))
    s.set_totals("w2", Totals({"a": {"sent": 10, "detected": 10}}, {"started": 1}))
    rows = s.rows()
    assert rows[0]["name"] == "WARNING"
    assert "overloaded now on 1 process" in rows[0]["note"]
    assert "3 markers owed meanwhile are unmeasured" in rows[0]["note"]
    assert rows[1]["unmeasured"] == 3 and rows[1]["missed"] == 0
    s.set_totals("w1", Totals({"a": {"sent": 10, "detected": 10}}, {"started": 1}))
    assert s.rows()[0]["name"] == "a"


def test_own_p95_per_clock_aligned_window_with_gaps_and_a_bounded_memory() -> None:
    clock = Clock(1000.0)
    series = OwnP95Series(clock=clock, every_s=5.0, keep_s=60.0)
    rng = np.random.default_rng(3)
    values = rng.uniform(0.010, 0.030, 200)
    for v in values:
        series.add("a", float(v))
    series.add("b", 0.040)
    clock.t = 1004.9
    assert series.snapshot() == (1004.9, [])  # the window 1000-1005 is still open
    clock.t = 1005.0
    now, points = series.snapshot()
    assert [t for t, _ in points] == [1005.0]
    assert points[0][1]["a"] == pytest.approx(np.quantile(values, 0.95) * 1000, abs=0.001)
    assert points[0][1]["b"] == pytest.approx(40.0)
    # Nothing for 20 s, then a value: no empty points in between.
    clock.t = 1027.0
    series.add("a", 0.012)
    clock.t = 1031.0
    assert [t for t, _ in series.snapshot()[1]] == [1005.0, 1030.0]
    # A long run keeps only the last keep_s.
    for _ in range(100):
        clock.t += 5.0
        series.add("a", 0.015)
    now, points = series.snapshot()
    assert len(points) <= 12 and points[0][0] >= now - 60.0
    series.clear()
    assert series.snapshot()[1] == []


def test_the_series_follows_local_detections_merged_reports_and_resets() -> None:
    clock = Clock(0.0)
    master = HopsStats(["a"], series=OwnP95Series(clock=clock))
    worker = HopsStats(["a"], for_master=True)
    worker.add_detection("a", 0.050, 0.020)
    master.merge_report("w1", worker.take_report(Totals()))
    master.add_detection("a", 0.050, 0.030)
    clock.t = 6.0
    assert master.series is not None
    assert master.series.snapshot()[1] == [(5.0, {"a": pytest.approx(29.5)})]
    master.reset()
    assert master.series.snapshot()[1] == []


def test_engine_config_from_env() -> None:
    cfg = EngineConfig.from_env({"PROBE_SINK_HOST": "10.0.0.7", "PROBE_HOP_ORDER": "a, b"})
    assert (cfg.sink_host, cfg.sink_port, cfg.advertise_host) == ("0.0.0.0", 0, "10.0.0.7")
    assert cfg.hop_order == ("a", "b")
    assert EngineConfig.from_env({}).sink_host == "127.0.0.1"
    assert EngineConfig.from_env({}).detect_nice == 10
    assert EngineConfig.from_env({"PROBE_DETECT_NICE": "0"}).detect_nice == 0
    for env, words in (
        ({"PROBE_SINK_LISTEN": "nope"}, "PROBE_SINK_LISTEN"),
        ({"PROBE_SINK_URL": "http://x/"}, "PROBE_SINK_URL"),
        ({"PROBE_MARKER_TIMEOUT": "0"}, "PROBE_MARKER_TIMEOUT"),
        ({"PROBE_DETECT_NICE": "-5"}, "PROBE_DETECT_NICE"),
        ({"PROBE_DETECT_NICE": "20"}, "PROBE_DETECT_NICE"),
    ):
        with pytest.raises(ConfigError, match=words):
            EngineConfig.from_env(env)
