"""The report's series and latencies kept as spooled records: the same report as Python objects
gave, written byte for byte as ``json.dump`` writes the list, and a registry whose Python heap
does not grow with the rows it settles."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probe.measure.latency import hop_order, own_latencies
from probe.measure.registry import Measurement, Missed, SessionRegistry
from probe.measure.report import SeriesRows, build_report, json_ready, load_report, write_report
from probe.measure.spool import Spool
from probe.measure.stats import summarize_ms


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def busy_run(sessions: int = 40, markers: int = 30, seed: int = 7) -> SessionRegistry:
    """Sessions overlapping in time, hops detected out of order, misses, a hop no one declared."""
    rng = random.Random(seed)
    clock = Clock()
    reg = SessionRegistry(clock=clock, marker_timeout=2.0, expected_hops=["a", "b", "return"])
    ids = [f"s{rng.randrange(10**6):06d}" for _ in range(sessions)]
    for sid in ids:
        reg.open_session(sid)
    delays = {"a": 0.02, "b": 0.09, "x": 0.05, "return": 0.15}
    for seq in range(markers):
        for k, sid in enumerate(ids):
            t = seq * 0.25 + k * 0.001 + rng.choice((0.0, 0.0005))  # equal send times happen
            clock.t = t
            reg.record_send(sid, seq, t)
            payload = reg.payload_for(sid, seq)
            for hop in rng.sample(list(delays), len(delays)):
                if rng.random() < 0.1:
                    continue  # missed on this hop
                arrival = t + delays[hop] + rng.random() * 0.01
                reg.record_detection(hop, payload, arrival, score=rng.random() * 20)
        clock.t = seq * 0.25 + 0.3
        reg.expire()
    clock.t += 10.0
    reg.expire()
    reg.settle_all()
    return reg


def old_series_rows(reg: SessionRegistry, order: list[str]) -> list[dict[str, Any]]:
    """The rows as build_report made them from the registry's objects before the spool."""
    rank = {hop: i for i, hop in enumerate(order)}
    series = reg.series()
    rows = sorted(series, key=lambda r: (r.send_time, r.session, r.seq, rank.get(r.hop, len(rank))))
    return [
        {
            "hop": r.hop,
            "session": r.session,
            "marker": r.seq,
            "send_time": r.send_time,
            "latency_ms": round(r.latency_s * 1000.0, 3) if isinstance(r, Measurement) else None,
            "outcome": (
                "detected" if isinstance(r, Measurement)
                else "unmeasured" if r.unmeasured else "missed"
            ),
        }
        for r in rows
    ]


@pytest.mark.parametrize("declared", [None, ["b", "a"]])
def test_report_from_records_matches_the_objects(declared: list[str] | None) -> None:
    reg = busy_run()
    report = build_report(reg, target="t", started_at=0.0, duration_s=8.0, hop_order=declared)
    measurements = reg.measurements()
    order = hop_order(measurements, declared, known=reg.hop_counts())
    assert [h["name"] for h in report["hops"]] == order
    own = own_latencies(measurements, order)
    for h in report["hops"]:
        cumulative = [m.latency_s for m in measurements if m.hop == h["name"]]
        assert h["latency_ms"] == summarize_ms(cumulative)
        expected = summarize_ms(own[h["name"]])
        got = h["own_latency_ms"]
        assert got["count"] == expected["count"]
        for key in ("p50", "p90", "p95", "p99", "p999", "max", "mean"):
            assert got[key] == pytest.approx(expected[key], abs=0.0011)
    series = report["series"]
    assert isinstance(series, SeriesRows)
    rows = old_series_rows(reg, order)
    assert len(series) == len(rows) == sum(
        c.detected + c.missed + c.unmeasured for c in reg.hop_counts().values()
    )
    assert list(series) == rows and series == rows and rows == series
    assert series[0] == rows[0] and series[-1] == rows[-1] and series[5:9] == rows[5:9]
    with pytest.raises(IndexError):
        series[len(rows)]


def test_written_report_is_json_dump_of_the_rows(tmp_path: Path) -> None:
    reg = busy_run(sessions=5, markers=6)
    report = build_report(reg, target="t", started_at=0.0, duration_s=2.0)
    path = tmp_path / "r.json"
    write_report(report, path)
    expected = json.dumps(json_ready(report), indent=2, allow_nan=False) + "\n"
    assert path.read_text() == expected
    assert load_report(path) == report
    empty = build_report(SessionRegistry(clock=Clock()), target="t", started_at=0.0,
                         duration_s=0.0)
    write_report(empty, path)
    assert path.read_text() == json.dumps(json_ready(empty), indent=2) + "\n"
    assert load_report(path)["series"] == []


def test_registry_objects_come_back_from_the_records() -> None:
    clock = Clock()
    reg = SessionRegistry(clock=clock, marker_timeout=1.0, expected_hops=["a"])
    reg.open_session("s")
    reg.record_send("s", 0, 0.0)
    reg.record_send("s", 1, 0.5)
    m = reg.record_detection("a", reg.payload_for("s", 0), 0.125, score=9.5)
    clock.t = 3.0
    reg.expire()
    assert reg.series() == [m, Missed(hop="a", session="s", seq=1, send_time=0.5)]
    assert reg.measurements() == [m] and reg.misses() == [reg.series()[1]]


def test_spool_spills_to_an_unlinked_file_and_reads_back() -> None:
    spool = Spool(np.float64)
    values = np.arange(100_000, dtype=np.float64) / 7.0
    for v in values:
        spool.append(v)
    assert len(spool) == len(values)
    assert np.array_equal(spool.view(), values)
    early = spool.view(10)
    spool.append(-1.0)
    assert np.array_equal(early, values[:10]) and spool.view()[-1] == -1.0
    spool.close()
    assert len(spool) == 0 and np.array_equal(early, values[:10])


def test_history_holds_no_python_object_per_row() -> None:
    """Settled rows and send lags go to the spool: the Python heap stays flat."""

    def settle(reg: SessionRegistry, clock: Clock, first: int, n: int) -> None:
        for i in range(first, first + n):
            sid = f"session-{i:08d}"
            reg.open_session(sid)
            for seq in range(20):
                t = clock.t = i * 10.0 + seq * 0.4
                reg.record_send(sid, seq, t)
                reg.record_send_lag(sid, 0.001)
                for hop, d in (("a", 0.02), ("b", 0.05)):
                    reg.record_detection(hop, reg.payload_for(sid, seq), t + d, score=10.0)
            reg.close_session(sid)
            clock.t += 100.0
            reg.expire()

    clock = Clock()
    reg = SessionRegistry(clock=clock, marker_timeout=1.0, session_ttl=1.0,
                          expected_hops=["a", "b", "return"])
    settle(reg, clock, 0, 200)  # warm-up: the spool's buffers and files exist
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        settle(reg, clock, 200, 1000)  # 60 000 rows, 20 000 send lags
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Left: a session name per session (~100 B each). 303 B per row would be 18 MB.
    assert grown < 400_000, grown
    report = build_report(reg, target="t", started_at=0.0, duration_s=1.0)
    assert len(report["series"]) == 1200 * 20 * 3
    assert report["send_lag_ms"]["count"] == 1200 * 20
