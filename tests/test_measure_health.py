"""The generator's own health: when the probe cannot keep up, it says so and blames nobody."""

from __future__ import annotations

import pytest

from probe.measure.health import Bounds, GeneratorHealth
from probe.measure.registry import SessionRegistry
from probe.measure.report import build_report, format_table


def _frames(h: GeneratorHealth, t0: float, t1: float, late_every: int | None) -> None:
    """50 frames a second from t0 to t1; every ``late_every``-th 30 ms late, the rest on time."""
    n = 0
    t = t0
    while t < t1:
        late = late_every is not None and n % late_every == 0
        h.frame_lag(t, 0.030 if late else 0.001)
        n += 1
        t += 0.02


def test_healthy_load_is_never_flagged() -> None:
    h = GeneratorHealth()
    _frames(h, 0.0, 60.0, late_every=200)  # 0.5 % late: p99 within 20 ms
    for s in range(60):
        h.cpu(float(s), "worker", 0.6)
        h.detection_delay(float(s), 0.3)
        assert not h.update(float(s) + 0.99)
    assert h.summary()["overloaded"] is False and not h.overlapped(0.0, 60.0)


def test_late_frames_open_a_period_that_closes_after_a_calm_window() -> None:
    h = GeneratorHealth(Bounds(window_s=10.0))
    _frames(h, 0.0, 20.0, late_every=200)
    assert not h.update(20.0)
    _frames(h, 20.0, 30.0, late_every=10)  # 10 % late
    assert h.update(30.0)
    _frames(h, 30.0, 50.0, late_every=None)
    for t in range(31, 51):
        h.update(float(t))
    assert not h.overloaded
    period = h.summary()["periods"][0]
    assert period["evidence"][0]["signal"] == "send_lag"
    assert 20.0 <= period["start"] <= 30.0 and period["end"] is not None
    assert h.overlapped(25.0, 26.0) and not h.overlapped(period["end"] + 1, 60.0)
    assert not h.overlapped(0.0, 15.0)


def test_a_saturated_process_or_a_detection_backlog_is_overload() -> None:
    h = GeneratorHealth()
    h.cpu(5.0, "sink", 0.99)
    assert h.update(5.5)
    assert h.summary()["periods"][0]["evidence"][0]["signal"] == "cpu_sink"
    h2 = GeneratorHealth()
    h2.detection_delay(3.0, 4.5)
    assert h2.update(3.2)
    assert h2.summary()["periods"][0]["evidence"][0]["value"] == 4.5


def test_markers_owed_while_overloaded_are_unmeasured_not_missed() -> None:
    now = [0.0]
    health = GeneratorHealth()
    reg = SessionRegistry(clock=lambda: now[0], marker_timeout=3.0, health=health)
    reg.open_session("s")
    reg.hop_connected("a", "s", None)
    reg.record_send("s", 0, 0.0)  # before the overload: a plain miss
    now[0] = 10.0
    reg.expire()
    reg.record_cpu("worker", 1.0)  # saturated from t = 10
    reg.record_send("s", 1, 10.0)
    now[0] = 14.0
    misses = reg.expire()
    assert [m.unmeasured for m in misses] == [True]
    c = reg.hop_counts()["a"]
    assert (c.sent, c.detected, c.missed, c.unmeasured, c.pending) == (2, 0, 1, 1, 0)
    report = build_report(reg, target="ws://x/", started_at=0.0, duration_s=14.0)
    assert report["generator"]["overloaded"] is True
    assert report["hops"][0]["markers"]["unmeasured"] == 1
    assert [r["outcome"] for r in report["series"]] == ["missed", "unmeasured"]
    table = format_table(report)
    assert table.startswith("WARNING: the probe itself was overloaded (cpu_worker past its bounds)")
    assert "1 markers owed meanwhile are counted unmeasured" in table


def _overloaded_report() -> dict[str, object]:
    now = [0.0]
    health = GeneratorHealth()
    reg = SessionRegistry(clock=lambda: now[0], marker_timeout=1.0, health=health,
                          expected_hops=("a",))
    reg.open_session("s")
    reg.record_cpu("sink", 0.99)
    reg.record_send("s", 0, 0.0)
    now[0] = 2.0
    reg.expire()
    return build_report(reg, target="ws://127.0.0.1:9/", started_at=0.0, duration_s=2.0)


def test_an_overloaded_canary_exits_2_and_pushes_no_success(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import probe.aio.runner as runner
    from probe.canary.metrics import probe_registry
    from probe.canary.thresholds import judge
    from probe.cli import main

    report = _overloaded_report()

    async def fake_run(*_a: object, **_k: object) -> dict[str, object]:
        return report

    monkeypatch.setattr(runner, "run_probe", fake_run)
    assert main(["canary", "--target", "ws://127.0.0.1:9/", "--threshold", "markers>=0%"]) == 2
    out = capsys.readouterr().out
    assert "canary: UNKNOWN (WARNING: the probe itself was overloaded (cpu_sink" in out
    reg = probe_registry(report, judge(report, []), duration_s=2.0, success=False)
    assert reg.get_sample_value("probe_generator_overloaded") == 1.0
    assert reg.get_sample_value("probe_success") == 0.0


def test_the_exporter_answers_an_overloaded_probe_with_success_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import probe.canary.exporter as exporter
    from probe.aio.runner import run_config
    from probe.config import run_defaults

    report = _overloaded_report()

    async def fake_run(*_a: object, **_k: object) -> dict[str, object]:
        return report

    monkeypatch.setattr(exporter, "run_probe", fake_run)
    exp = exporter.ProbeExporter({}, run_config, defaults=run_defaults())
    body = exp.probe("target=ws://127.0.0.1:9/").body.decode()
    assert "probe_success 0.0" in body and "probe_generator_overloaded 1.0" in body


def test_the_detection_worker_reports_how_long_work_waited() -> None:
    import threading

    from probe.aio.hopstream import DetectionWorker

    now = [0.0]
    worker = DetectionWorker(clock=lambda: now[0])
    gate = threading.Event()
    worker.submit(gate.wait)
    worker.submit(lambda: None)  # queued at t = 0 behind the blocked item
    now[0] = 2.5
    gate.set()
    worker.drain(5.0)
    assert worker.take_max_wait() == 2.5
    assert worker.take_max_wait() == 0.0  # reset by the read
    worker.close()


def test_a_sink_child_backlog_past_its_bound_drops_audio_and_flags_the_generator() -> None:
    from probe.aio.sinkproc import SinkChild
    from probe.measure import sinkwire as wire
    from probe.protocol import AudioFormat

    class Queued(SinkChild):
        """The shared part of both shells, with the child never reading: nothing is written."""

        def __init__(self, registry: SessionRegistry) -> None:
            super().__init__(registry)
            self.queued: list[wire.Message] = []

        def _send(self, msg: wire.Message) -> None:
            self.queued.append(msg)

    now = [5.0]
    health = GeneratorHealth()
    reg = SessionRegistry(clock=lambda: now[0], health=health)
    child = Queued(reg)
    child.max_queued_audio = 640 * 10  # ten 20 ms frames of 16 kHz pcm16
    stream = child.open_stream("return", AudioFormat("pcm_s16le", 16000, 1), "s")
    for k in range(10):
        stream.feed(b"\0" * 640, k * 0.02)
    assert child.queued_audio == 6400 and child.audio_dropped == 0
    assert not health.update(5.0)
    stream.feed(b"\0" * 640, 0.2)  # the eleventh: past the bound, dropped and flagged
    assert child.audio_dropped == 1 and child.queued_audio == 6400
    assert sum(type(m) is wire.StreamAudio for m in child.queued) == 10
    assert health.update(5.1)
    summary = health.summary()
    assert summary["frames_shed"] == 1
    (breach,) = summary["periods"][0]["evidence"]
    assert (breach["signal"], breach["value"], breach["bound"]) == ("sink_backlog", 6400, 6400)
    # Once the shell has written the queue, audio is taken again.
    child._written(child.queued)
    assert child.queued_audio == 0
    stream.feed(b"\0" * 640, 0.22)
    assert child.audio_dropped == 1 and child.queued_audio == 640


def test_the_detection_delay_bound_is_at_most_half_the_marker_timeout() -> None:
    from probe.measure.health import bounds_for

    assert bounds_for(10.0).detection_delay_s == 2.0
    assert bounds_for(3.0).detection_delay_s == 1.5
    assert bounds_for(1.0, Bounds(detection_delay_s=5.0, cpu_share=0.5)) == Bounds(
        detection_delay_s=0.5, cpu_share=0.5
    )


def test_a_sink_child_silent_past_the_bound_is_overload_until_it_is_stopped() -> None:
    h = GeneratorHealth(Bounds(detection_delay_s=2.0))
    for t in (0.25, 0.5, 0.75, 1.0):
        h.heard(t, "sink")
        assert not h.update(t)
    assert not h.update(2.9)  # 1.9 s without a report: within the bound
    assert h.update(3.5)
    (breach,) = h.summary()["periods"][0]["evidence"]
    assert (breach["signal"], breach["value"], breach["at"]) == ("sink_silent", 2.5, 1.0)
    # Stopped as asked: neither its silence nor a late report counts any more.
    h2 = GeneratorHealth(Bounds(detection_delay_s=2.0))
    h2.heard(1.0, "sink")
    h2.heard(1.1, gone="sink")
    h2.heard(1.2, "sink")
    assert not h2.update(30.0)
