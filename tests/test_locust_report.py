"""Locust request entries fired for what a run measures (conversation timing), fed through a real
registry and observers; Locust's event hook is a recorder (importing Locust patches the process)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from probe.locust.hopstats import HopsStats
from probe.locust.report import ConversationMissed, LocustReporter
from probe.measure.conversation import Figure, ResultTiming
from probe.measure.observe import Observers
from probe.measure.registry import SessionRegistry


class Events:
    """Locust's ``events`` as far as the reporter uses it: ``request.fire(**kw)``, recorded."""

    def __init__(self) -> None:
        self.fired: list[dict[str, Any]] = []
        outer = self

        class request:  # noqa: N801 - Locust's event hook name
            @staticmethod
            def fire(**kw: Any) -> None:
                outer.fired.append(kw)

        self.request = request


def test_results_and_figures_become_request_entries(caplog: pytest.LogCaptureFixture) -> None:
    events = Events()
    reporter = LocustReporter(events, HopsStats([]), marker_timeout_s=5.0)
    reg = SessionRegistry(clock=lambda: 10.0, observer=Observers([reporter]))
    reg.open_session("s")
    caplog.set_level(logging.WARNING, logger="probe.locust.report")
    reg.record_result(ResultTiming("s", "interim", 11.2, 11.0, 0.2, "the quick", 0))
    reg.record_result(ResultTiming("s", "final", 12.0, 11.7, 0.3, "the quick brown", 0))
    reg.record_result(ResultTiming("s", "final", 13.0, None, None, "fox", 1))
    reg.record_result(ResultTiming("s", "interim", 13.5, None, None, "jumps", 2))
    reg.record_figure(Figure("s", "first_interim", 10.1, 0.9, utterance=0))
    reg.record_figure(Figure("s", "final_delay", 12.0, None, "never finalized", 1))
    reg.record_figure(Figure("s", "clear", 14.0, None))
    reg.record_figure(Figure("s", "barge_in", 14.0, 0.15))
    entries = [(e["request_type"], e["name"], round(e["response_time"], 6)) for e in events.fired]
    assert entries == [
        ("result", "interim", 200.0),
        ("result", "final", 300.0),
        ("conversation", "first_interim", 900.0),
        ("conversation", "final_delay", 5000.0),
        ("conversation", "clear", 5000.0),
        ("conversation", "barge_in", 150.0),
    ]
    failures = {e["name"]: e["exception"] for e in events.fired if e["exception"] is not None}
    assert set(failures) == {"final_delay", "clear"}
    assert all(isinstance(x, ConversationMissed) for x in failures.values())
    assert str(failures["final_delay"]) == "never finalized"
    assert str(failures["clear"]) == "no clear within 5 s"
    # Results without offsets fire nothing; the log says so once.
    assert reporter.results_without_offsets == 2
    warnings = [r for r in caplog.records if "without offsets" in r.getMessage()]
    assert len(warnings) == 1
